"""Pure functions: per-variable gradient norms and variable naming (TensorFlow, and
`squared_norm` and `to_numpy` on every backend).

Nothing here holds Keras state: every function takes tensors or variables
and returns tensors or plain Python values, so it can run inside a compiled
train step (`tf.function`, `jit_compile=True`) as well as eagerly.
"""

import keras
import numpy as np

from keras_gradtools._tensorflow import tf


def variable_key(variable):
    """Returns the key under which a variable's gradient norm is recorded.

    Keras 3 variables carry a `path` (`"sequential/dense_3/kernel"`): the
    layer path plus the variable's name, unique within a functional model.
    Plain `tf.Variable`s fall back to their `name` without the `:0` suffix.

    Args:
        variable: a `keras.Variable` or `tf.Variable`.

    Returns:
        The key, a string.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2, name="out")
    >>> layer.build((None, 3))
    >>> variable_key(layer.kernel)
    'out/kernel'
    """
    path = getattr(variable, "path", None)
    if path:
        return path
    return variable.name.split(":")[0]


def to_numpy(value):
    """Returns a host NumPy copy of a Keras variable or a backend tensor.

    The copy does not change when the variable is later assigned to.

    Keras' `Variable.numpy()` and `keras.ops.convert_to_numpy` go through
    `np.array(x, copy=False)` on some backends, which NumPy 2 answers with a
    `DeprecationWarning` for JAX and torch tensors. This reads each backend's
    tensor its own way (TensorFlow `.numpy()`, torch `.detach().cpu().numpy()`,
    otherwise `np.asarray`), so nothing warns. NumPy arrays and Python numbers
    pass through `np.asarray`. A torch bfloat16 tensor comes back as float32
    (NumPy has no bfloat16 of its own).

    Example:

    >>> to_numpy(keras.Variable([1.0, 2.0])).tolist()
    [1.0, 2.0]
    """
    inner = getattr(value, "value", None)
    if inner is not None and not callable(inner):  # a Keras variable's backend tensor
        value = inner  # (a tf.Variable's `value` is a method: it has `numpy()` itself)
    if hasattr(value, "detach"):  # torch (on a CPU `.numpy()` shares the tensor's memory)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return np.array(value.numpy())
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # TensorFlow
        return np.array(value.numpy())
    return np.asarray(value)


def is_bias(variable):
    """Tells whether a variable is a bias.

    The article filters with `'bias' not in name`, a substring test on the
    full name, which also drops every weight of a layer whose *name* happens
    to contain "bias" and keeps biases whose name does not. Here a bias is a
    variable whose own name (the last part of its path) is exactly `bias`,
    as in `Dense`, `Conv*`, `LSTM`/`GRU` cells and `MultiHeadAttention`.
    Batch normalization's `beta` is a learned shift, not named `bias`, and is
    recorded.

    Args:
        variable: a `keras.Variable` or `tf.Variable`.

    Returns:
        `True` when the variable is a bias.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2, name="bias_net")
    >>> layer.build((None, 3))
    >>> [is_bias(v) for v in layer.weights]
    [False, True]
    """
    return variable_key(variable).split("/")[-1] == "bias"


def select_variables(variables, include_biases=False):
    """Returns the variables whose gradient norms are recorded, in order.

    Non-float variables and variables that Keras overwrites with their
    "gradient" (`overwrite_with_gradient`, used by float8 training for its
    scaling factors) are never recorded. Biases are left out unless
    `include_biases` is set. Duplicates (a shared variable listed twice) are
    kept once.

    Args:
        variables: a list of variables, e.g. `model.trainable_variables`.
        include_biases: whether biases are recorded. Defaults to `False`.

    Returns:
        A list of variables.
    """
    selected = []
    seen = set()
    for variable in variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        if "float" not in keras.backend.standardize_dtype(variable.dtype):
            continue
        if getattr(variable, "overwrite_with_gradient", False):
            continue
        if not include_biases and is_bias(variable):
            continue
        selected.append(variable)
    return selected


def unique_keys(variables):
    """Returns one key per variable, made unique where two paths collide.

    Subclassed models may give two layers the same name, so two variables can
    share a path. The second and later ones get a `#1`, `#2`, ... suffix, in
    the order given.

    Args:
        variables: a list of variables.

    Returns:
        A list of strings, one per variable.

    Example:

    >>> import tensorflow as tf
    >>> a, b = tf.Variable(1.0, name="w"), tf.Variable(2.0, name="w")
    >>> unique_keys([a, b])
    ['w', 'w#1']
    """
    keys = []
    counts = {}
    for variable in variables:
        key = variable_key(variable)
        if key in counts:
            counts[key] += 1
            key = f"{key}#{counts[key]}"
        else:
            counts[key] = 0
        keys.append(key)
    return keys


def _dedup_indexed_slices(gradient):
    """Sums the rows of an `IndexedSlices` that share an index.

    An embedding used twice in a batch gets one slice per use, and the dense
    gradient is their sum: the norm of the slices' values alone would be
    wrong. Sorting keeps every shape static, so this also compiles with XLA.
    """
    indices = tf.reshape(tf.cast(gradient.indices, tf.int32), [-1])
    values = gradient.values
    count = tf.shape(indices)[0]
    order = tf.argsort(indices)
    sorted_indices = tf.gather(indices, order)
    sorted_values = tf.gather(values, order)
    is_new = tf.concat(
        [
            tf.ones([tf.minimum(count, 1)], tf.int32),
            tf.cast(
                tf.not_equal(sorted_indices[1:], sorted_indices[:-1]), tf.int32
            ),
        ],
        axis=0,
    )
    segment_ids = tf.cumsum(is_new) - 1
    return tf.math.unsorted_segment_sum(sorted_values, segment_ids, count)


def half_squared_norm(gradient):
    """`sum(g ** 2) / 2` of one gradient, as a float32 scalar (`tf.nn.l2_loss`).

    The building block of `gradient_norm`: one fused kernel, one pass over
    the gradient. Same conventions as `gradient_norm` for dtypes,
    `tf.IndexedSlices` and `None`.

    Args:
        gradient: a tensor, a `tf.IndexedSlices` or `None`.

    Returns:
        A scalar float32 tensor.
    """
    if gradient is None:
        return tf.constant(0.0, tf.float32)
    if isinstance(gradient, tf.IndexedSlices):
        gradient = _dedup_indexed_slices(gradient)
    # l2_loss is one fused kernel (sum of squares / 2): one pass, one op.
    return tf.nn.l2_loss(tf.cast(gradient, tf.float32))


def squared_norm(gradient):
    """`sum(g ** 2)` of one gradient, as a float32 scalar, on any backend.

    On TensorFlow `2 * half_squared_norm(gradient)` (sparse gradients as
    their dense sum); on JAX and PyTorch `keras.ops` in float32 (on JAX's
    CPU backend, the square fused into the sum as the norm's own). The one
    place clipping and the recorder take a squared norm off TensorFlow.

    Args:
        gradient: a tensor (or, on TensorFlow, a `tf.IndexedSlices`).

    Returns:
        A scalar float32 tensor.

    Example:

    >>> float(squared_norm(tf.constant([3.0, 4.0])))
    25.0
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return 2.0 * half_squared_norm(gradient)
    if backend == "jax":
        gradient = _unshared_on_cpu(gradient)
    return keras.ops.sum(keras.ops.square(keras.ops.cast(gradient, "float32")))


def _unshared_on_cpu(gradient):
    """JAX: `gradient` behind an optimization barrier on XLA's CPU backend (same values).

    The optimizer squares each gradient too (Adam's second moment). Without
    the barrier XLA merges the norm's `square(g)` with the optimizer's, and
    its CPU backend then writes the squared gradient to memory and reads it
    back for the sum: two more passes over every gradient. Behind the
    barrier the square is the norm's own, fused into its sum: one read. On
    other platforms the gradient is returned as it is.
    """
    import jax

    if jax.default_backend() != "cpu":
        return gradient
    return jax.lax.optimization_barrier(gradient)


def gradient_norm(gradient):
    """Returns the L2 norm of one gradient, as a float32 scalar tensor.

    The sum of squares is taken in float32 whatever the gradient's dtype, so
    float16 gradients do not overflow at 256. `tf.IndexedSlices` (the sparse
    gradients of `Embedding` and `tf.gather`) give the norm of the dense
    gradient they stand for, repeated indices summed first. `None` (a
    variable that the loss does not depend on) gives 0.

    Args:
        gradient: a tensor, a `tf.IndexedSlices` or `None`.

    Returns:
        A scalar float32 tensor.

    Example:

    >>> float(gradient_norm(tf.constant([3.0, 4.0])))
    5.0
    """
    return tf.sqrt(2.0 * half_squared_norm(gradient))


def gradient_norms(gradients):
    """Returns the L2 norm of each gradient, stacked into one float32 vector.

    Args:
        gradients: a list of tensors, `tf.IndexedSlices` or `None`.

    Returns:
        A float32 tensor of shape `(len(gradients),)`.

    Example:

    >>> gradient_norms([tf.constant([3.0, 4.0]), None]).numpy().tolist()
    [5.0, 0.0]
    """
    if not gradients:
        return tf.zeros([0], tf.float32)
    return tf.sqrt(2.0 * tf.stack([half_squared_norm(g) for g in gradients]))


def global_norm(norms, axis=-1):
    """Combines per-variable norms into the norm of all gradients together.

    `sqrt(sum(norm_i ** 2))`, computed in float64 on the host so that large
    norms do not overflow.

    Args:
        norms: array-like of per-variable norms; the last axis runs over
            variables.
        axis: the axis that runs over variables. Defaults to `-1`.

    Returns:
        A NumPy array (or float) of global norms.

    Example:

    >>> float(global_norm([3.0, 4.0]))
    5.0
    """
    norms = np.asarray(norms, dtype=np.float64)
    return np.sqrt(np.sum(np.square(norms), axis=axis))
