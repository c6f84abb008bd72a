"""MNIST loading: the bundled copy, a keras-style `.npz` path, or keras' downloader."""

import hashlib
import os
import zipfile

import numpy as np

BUNDLED_MNIST = os.path.join(os.path.dirname(__file__), "bundled", "mnist.npz")
BUNDLED_MNIST_SHA256 = (
    "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
)
_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_npz(path):
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} cannot be read as a .npz file (not a zip archive); it may be "
            f"truncated or corrupt. Received: path={path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise ValueError(
                    f"{path} is not a keras-style MNIST .npz: it lacks "
                    f"{', '.join(missing)} (it needs x_train, y_train, x_test, "
                    f"y_test). Received: path={path!r}"
                )
            arrays = {k: data[k] for k in _KEYS}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{path} cannot be read as a .npz file ({e}); it may be truncated "
            f"or corrupt. Received: path={path!r}"
        ) from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(
                f"{path} has x_{split} of shape {x.shape} and y_{split} of "
                f"shape {y.shape}; MNIST needs (N, 28, 28) images and N "
                f"labels. Received: path={path!r}"
            )
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
            raise ValueError(
                f"{path} has x_{split} values outside MNIST's pixel range [0, 255] "
                f"(min {np.nanmin(x)}, max {np.nanmax(x)}, "
                f"{int(np.sum(~np.isfinite(x)))} NaN or Inf). Received: path={path!r}"
            )
        if not np.all((y >= 0) & (y <= 9) & (y == np.floor(y))):
            bad = np.flatnonzero(~((y >= 0) & (y <= 9) & (y == np.floor(y))))
            raise ValueError(
                f"{path} has y_{split} labels that are not the digits 0-9 (first at "
                f"index {int(bad[0])}: {y[bad[0]].item()!r}). Received: path={path!r}"
            )
    return arrays


def load_mnist(source="bundled", flatten=True, subset=None):
    """Loads MNIST with the article's preprocessing.

    Images become float32 in [0, 1] (`x / 255.0`), flattened to 784 values
    for the dense models or shaped `(28, 28, 1)` for the convolutional ones.
    Labels are integer class ids (use `sparse_categorical_crossentropy`).

    Sources:

    - `"bundled"`: the copy of real MNIST shipped inside the package,
      checked against its sha256 on every load. MNIST is by Yann LeCun,
      Corinna Cortes and Christopher J.C. Burges, under CC BY-SA 3.0.
    - a path to a keras-style `.npz` (`x_train`, `y_train`, `x_test`,
      `y_test`), such as the file keras caches in `~/.keras/datasets/`.
    - `"keras"`: `keras.datasets.mnist.load_data()`, which downloads on first
      use and so needs the internet. Nothing else here downloads.

    Args:
        source: `"bundled"`, `"keras"` or a path. Defaults to `"bundled"`.
        flatten: `True` for `(N, 784)` images, `False` for `(N, 28, 28, 1)`.
            Defaults to `True`.
        subset: keep only the first `subset` training samples (the test set
            is kept whole), or `None` for all. Defaults to `None`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.

    Raises:
        FileNotFoundError: if the path (or the bundled copy) does not exist.
        ValueError: if the file is corrupt, fails its checksum, is not
            MNIST-shaped, or `subset` is not a positive integer.

    Example:

    >>> (x, y), (x_test, y_test) = load_mnist(subset=100)
    >>> x.shape, x.dtype.name, float(x.max()) <= 1.0, y[:5].tolist()
    ((100, 784), 'float32', True, [5, 0, 4, 1, 9])
    """
    if subset is not None and (
        not isinstance(subset, (int, np.integer)) or subset < 1
    ):
        raise ValueError(
            f"`subset` must be a positive integer or None. Received: subset={subset!r}"
        )
    if source == "keras":
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    else:
        path = BUNDLED_MNIST if source == "bundled" else os.fspath(source)
        if not os.path.isfile(path):
            hint = (
                "Reinstall keras_gradtools: its bundled copy is missing."
                if source == "bundled"
                else "Pass an existing keras-style mnist.npz, 'bundled' for the "
                "copy shipped with keras_gradtools, or 'keras' to download."
            )
            raise FileNotFoundError(f"No MNIST file at {path}. {hint}")
        if source == "bundled" and _sha256(path) != BUNDLED_MNIST_SHA256:
            raise ValueError(
                f"The bundled MNIST at {path} fails its sha256 check "
                f"(expected {BUNDLED_MNIST_SHA256}): the file is corrupt. "
                "Reinstall keras_gradtools."
            )
        arrays = _read_npz(path)

    def prep(x):
        x = x.astype("float32") / 255.0
        return x.reshape(len(x), -1) if flatten else x.reshape(len(x), 28, 28, 1)

    x_train, y_train = arrays["x_train"], arrays["y_train"]
    if subset is not None:
        x_train, y_train = x_train[:subset], y_train[:subset]
    return (
        (prep(x_train), y_train.astype("int64")),
        (prep(arrays["x_test"]), arrays["y_test"].astype("int64")),
    )
