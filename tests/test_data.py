"""load_mnist: the bundled copy, user paths, and clear errors for bad files."""

import numpy as np
import pytest

from keras_gradtools import data


def test_bundled_mnist_is_real_and_preprocessed():
    (x, y), (xt, yt) = data.load_mnist()
    assert x.shape == (60000, 784) and xt.shape == (10000, 784)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() == 1.0
    # Class counts of y_train from the original distribution.
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_image_layout_and_subset():
    (x, y), (xt, _) = data.load_mnist(flatten=False, subset=10)
    assert x.shape == (10, 28, 28, 1) and len(y) == 10
    assert xt.shape == (10000, 28, 28, 1)


def test_user_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mini.npz"
    np.savez(path, x_train=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
             y_train=np.arange(5, dtype=np.uint8),
             x_test=np.full((2, 28, 28), 255, np.uint8), y_test=np.zeros(2, np.uint8))
    (x, y), (xt, yt) = data.load_mnist(path)
    assert x.shape == (5, 784) and y.tolist() == [0, 1, 2, 3, 4]
    assert np.all(xt == 1.0)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load_mnist(tmp_path / "nope.npz")


def test_corrupt_file_names_it(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.npz.*corrupt"):
        data.load_mnist(path)


def test_wrong_layout_names_missing_arrays(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, images=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="lacks x_train, y_train, x_test, y_test"):
        data.load_mnist(path)
    np.savez(path, x_train=np.zeros((2, 32, 32)), y_train=np.zeros(2),
             x_test=np.zeros((1, 28, 28)), y_test=np.zeros(1))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        data.load_mnist(path)


def test_values_that_are_not_mnist_are_refused(tmp_path):
    path = tmp_path / "odd.npz"

    def save(x_train, y_train):
        np.savez(path, x_train=x_train, y_train=y_train,
                 x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))

    pixels = np.zeros((3, 28, 28), np.float32)
    pixels[1, 4, 5] = np.nan
    save(pixels, np.arange(3))
    with pytest.raises(ValueError, match=r"x_train values outside .* 1 NaN or Inf"):
        data.load_mnist(path)
    save(np.full((3, 28, 28), -1.0), np.arange(3))  # already normalized, say
    with pytest.raises(ValueError, match=r"pixel range \[0, 255\] \(min -1.0"):
        data.load_mnist(path)
    save(np.zeros((3, 28, 28), np.uint8), np.array([3, 10, 1]))
    with pytest.raises(ValueError, match="not the digits 0-9 .first at index 1: .*10"):
        data.load_mnist(path)


def test_a_file_that_is_not_a_zip_is_named_corrupt(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(ValueError, match="text.npz.*corrupt"):
        data.load_mnist(path)


def test_bundled_checksum_is_enforced(tmp_path, monkeypatch):
    fake = tmp_path / "mnist.npz"
    fake.write_bytes(b"tampered")
    monkeypatch.setattr(data, "BUNDLED_MNIST", str(fake))
    with pytest.raises(ValueError, match="sha256"):
        data.load_mnist()


def test_bad_subset():
    with pytest.raises(ValueError, match="Received: subset=0"):
        data.load_mnist(subset=0)
