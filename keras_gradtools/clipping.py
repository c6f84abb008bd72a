"""Gradient clipping: small pure functions, and optimizer presets that use them.

Each method is a function `grads -> grads` (or `(grads, variables) -> grads`,
or, for the stateful ones, `(grads, state) -> (grads, state)` with the state a
tuple of tensors), in the spirit of Optax. They are written with `keras.ops`
and run on every backend: eagerly, inside `tf.function` (also with
`jit_compile=True`), under `jax.jit`, on PyTorch, and on GPU. Presets only
combine them:

- `clipped_optimizer(name, clip=..., threshold=...)` returns a stock Keras
  optimizer configured with its own `clipnorm` / `clipvalue` /
  `global_clipnorm` for `"norm"`, `"value"`, `"global_norm"`, and a
  `ClippedOptimizer` (a serializable wrapper, built like Keras'
  `LossScaleOptimizer`) for `"agc"`, `"autoclip"` and `"zclip"`, whose state
  lives in optimizer variables and is saved with the model.
- Under a `tf.distribute` strategy with several replicas, Keras' own
  clipping acts on each replica's share of the gradient *before* the shares
  are summed (so `global_clipnorm` is not global). `clipped_optimizer`
  called inside `strategy.scope()` then returns a `ClippedOptimizer` for
  every method, which clips the summed gradient, once, after the
  all-reduce that the optimizer does anyway.

`None` gradients pass through untouched everywhere.
"""

import collections
import functools

import keras
import numpy as np
from keras import ops

from keras_gradtools import internals
from keras_gradtools import norms as norms_lib
from keras_gradtools._tensorflow import tf

CLIP_METHODS = ("none", "value", "norm", "global_norm", "agc", "autoclip", "zclip")
# Keras' own clipping arguments, the one place they are spelled.
KERAS_CLIP_ARGUMENTS = ("clipnorm", "clipvalue", "global_clipnorm")
_KERAS_ARGUMENT = dict(zip(("norm", "value", "global_norm"), KERAS_CLIP_ARGUMENTS))
_DEFAULT_THRESHOLD = {"value": 1.0, "norm": 1.0, "global_norm": 1.0, "agc": 0.01,
                      "autoclip": 10.0, "zclip": 2.5}
_WRAPPER_METHODS = ("value", "norm", "global_norm", "agc", "autoclip", "zclip")


def _on_tensorflow():
    return keras.backend.backend() == "tensorflow"


def _is_sparse(g):
    return _on_tensorflow() and isinstance(g, tf.IndexedSlices)


def _map(fn, grads):
    out = []
    for g in grads:
        if g is None:
            out.append(None)
        elif _is_sparse(g):
            out.append(tf.IndexedSlices(fn(g.values), g.indices, g.dense_shape))
        else:
            out.append(fn(g))
    return out


def _gradient_norm(g):
    """The L2 norm of one gradient (float32 scalar); sparse TF gradients as their dense sum."""
    return ops.sqrt(norms_lib.squared_norm(g))


def _dense(g):
    return tf.convert_to_tensor(g) if _is_sparse(g) else g


def _count_dtype():
    # JAX runs without 64-bit integers unless asked; TF keeps the int64 it saved with.
    return "int64" if _on_tensorflow() else "int32"


def clip_by_value(grads, threshold):
    """Clips every gradient element to `[-threshold, threshold]` (Keras' `clipvalue`).

    Args:
        grads: list of gradients.
        threshold: positive float.

    Returns:
        The clipped gradients.

    References:
        Keras `Optimizer(clipvalue=...)`.

    Example:

    >>> [g.numpy().tolist() for g in clip_by_value([tf.constant([3.0, -0.5])], 1.0)]
    [[1.0, -0.5]]
    """
    return _map(lambda g: ops.clip(g, -threshold, threshold), grads)


def clip_by_norm(grads, threshold):
    """Rescales each gradient whose L2 norm exceeds `threshold` (Keras' `clipnorm`).

    Args:
        grads: list of gradients.
        threshold: positive float.

    Returns:
        The clipped gradients.

    References:
        Pascanu, Mikolov, Bengio (2013), "On the difficulty of training
        recurrent neural networks"; Keras `Optimizer(clipnorm=...)`.

    Example:

    >>> [round(float(v), 6) for v in clip_by_norm([tf.constant([3.0, 4.0])], 1.0)[0]]
    [0.6, 0.8]
    """
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        norm = _gradient_norm(g)
        scale = ops.minimum(1.0, threshold / ops.maximum(norm, 1e-30))
        out.append(_map(lambda v: v * ops.cast(scale, v.dtype), [g])[0])
    return out


def global_norm(grads):
    """The L2 norm of all gradients together (float32 scalar tensor)."""
    present = [g for g in grads if g is not None]
    if not present:
        return ops.zeros((), "float32")
    return ops.sqrt(sum(norms_lib.squared_norm(g) for g in present))


def clip_by_global_norm(grads, threshold, norm=None):
    """Rescales all gradients together when their global norm exceeds `threshold`.

    Args:
        grads: list of gradients.
        threshold: positive float or scalar tensor.
        norm: the global norm, if already computed. Defaults to `None`.

    Returns:
        The clipped gradients.

    References:
        Keras `Optimizer(global_clipnorm=...)`; `tf.clip_by_global_norm`.

    Example:

    >>> out = clip_by_global_norm([tf.constant([3.0]), tf.constant([4.0])], 1.0)
    >>> [round(float(g[0]), 6) for g in out]
    [0.6, 0.8]
    """
    norm = global_norm(grads) if norm is None else norm
    scale = ops.minimum(1.0, ops.cast(threshold, "float32") / ops.maximum(norm, 1e-30))
    return _map(lambda g: g * ops.cast(scale, g.dtype), grads)


def unitwise_norm(x):
    """Unit-wise L2 norm as in NFNets: one norm per output unit, broadcastable to `x`.

    Scalars and vectors (biases, gains) are one unit; a Dense kernel
    `(in, out)` has one unit per output column (norm over axis 0); a conv
    kernel `(h, w, in, out)` (and 1-D/3-D convs) one per output channel (norm
    over every axis but the last).

    Args:
        x: a tensor.

    Returns:
        A tensor of norms with `keepdims` shape.
    """
    x = ops.cast(x, "float32")
    rank = len(x.shape)
    if rank <= 1:
        return ops.sqrt(ops.sum(ops.square(x), keepdims=True))
    axes = tuple(range(rank - 1))
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


def adaptive_clip(grads, variables, clip_factor=0.01, eps=1e-3, skip=None):
    """AGC: clips each unit's gradient to `clip_factor` times its weight's norm.

    For each unit `i` (output column or channel), if
    `||G_i|| > clip_factor * max(||W_i||, eps)` the unit's gradient is scaled
    to that bound. The paper leaves the final classifier unclipped: pass
    its variables' positions in `skip`.

    Args:
        grads: list of gradients.
        variables: the matching variables.
        clip_factor: lambda. Defaults to `0.01`.
        eps: floor on the weight norm. Defaults to `1e-3`.
        skip: indices of variables left unclipped. Defaults to `None`.

    Returns:
        The clipped gradients.

    References:
        Brock, De, Smith, Simonyan (2021), "High-Performance Large-Scale
        Image Recognition Without Normalization" (NFNets), section 4.1.

    Example:

    >>> w = tf.Variable([[1.0], [0.0]])   # ||W|| = 1 for the one unit
    >>> g = [tf.constant([[3.0], [4.0]])]  # ||G|| = 5 > 0.1 * 1
    >>> [round(float(v), 6) for v in adaptive_clip(g, [w], clip_factor=0.1)[0][:, 0]]
    [0.06, 0.08]
    """
    skip = set(skip or ())
    out = []
    for i, (g, v) in enumerate(zip(grads, variables)):
        if g is None or i in skip:
            out.append(g)
            continue
        dense = _dense(g)
        weight = v.value if isinstance(v, keras.Variable) else v
        w_norm = ops.maximum(unitwise_norm(weight), eps)
        g_norm = unitwise_norm(dense)
        max_norm = w_norm * clip_factor
        scale = ops.where(g_norm > max_norm, max_norm / ops.maximum(g_norm, 1e-6), 1.0)
        out.append(dense * ops.cast(scale, dense.dtype))
    return out


def autoclip_init(history_size=10000):
    """AutoClip's initial state: `(history, count)`."""
    return (ops.zeros((history_size,), "float32"), ops.zeros((), _count_dtype()))


def _percentile(values, count, percentile):
    """NumPy's linear-interpolation percentile of the first `count` of `values`."""
    size = values.shape[0]
    count = ops.cast(count, "int32")
    n = ops.minimum(count, size)
    valid = ops.arange(size, dtype="int32") < n
    ordered = ops.sort(ops.where(valid, values, np.inf))
    last = ops.maximum(n - 1, 0)
    position = percentile / 100.0 * ops.cast(last, "float32")
    lo = ops.cast(ops.floor(position), "int32")
    hi = ops.minimum(lo + 1, last)
    frac = position - ops.cast(lo, "float32")
    low, high = ops.take(ordered, lo), ops.take(ordered, hi)
    return low + (high - low) * frac


def autoclip(grads, state, percentile=10.0):
    """AutoClip: clip the global norm to a percentile of all norms seen so far.

    The current global norm joins the history first; the threshold is the
    `percentile`-th percentile (NumPy's linear interpolation) of the
    history; the gradients are clipped to it by global norm. The history is
    a ring of the last `history_size` norms (see `autoclip_init`).

    Args:
        grads: list of gradients.
        state: `(history, count)`.
        percentile: p, in [0, 100]. Defaults to `10.0` (the paper's).

    Returns:
        `(clipped_grads, new_state)`.

    References:
        Seetharaman, Wichern, Pardo, Le Roux (2020), "AutoClip: Adaptive
        Gradient Clipping for Source Separation Networks".
    """
    history, count = state
    norm = global_norm(grads)
    size = history.shape[0]
    slot = ops.cast(ops.mod(count, size), "int32")
    history = ops.scatter_update(history, ops.reshape(slot, (1, 1)), ops.reshape(norm, (1,)))
    count = count + 1
    threshold = _percentile(history, count, percentile)
    return clip_by_global_norm(grads, threshold, norm=norm), (history, count)


def zclip_init():
    """ZClip's initial state: `(mean, var, count, warm_sum, warm_sumsq)`."""
    zero = ops.zeros((), "float32")
    return (zero, zero, ops.zeros((), _count_dtype()), zero, zero)


def zclip(grads, state, zscore=2.5, alpha=0.97, warmup=25):
    """ZClip: z-score spike detection on the global norm, EMA statistics.

    The first `warmup` steps pass unclipped while their global norms are
    averaged; their mean and variance start the statistics. Afterwards, with
    `z = (g - mean) / std`, a step with `z > zscore` is scaled back to the
    norm `mean + zscore**2 / z * std` (ZClip's reciprocal adjustment, below
    the threshold and closer to the mean the larger the spike), and the
    statistics are updated with the (clipped) norm:
    `mean <- alpha * mean + (1 - alpha) * g`,
    `var <- alpha * var + (1 - alpha) * (g - mean)**2` (with the new mean).

    Args:
        grads: list of gradients.
        state: `(mean, var, count, warm_sum, warm_sumsq)`.
        zscore: the z threshold. Defaults to `2.5`.
        alpha: EMA weight of the past. Defaults to `0.97`.
        warmup: steps before clipping. Defaults to `25`.

    Returns:
        `(clipped_grads, new_state)`.

    References:
        Kumar, Owen, Ashkboos, et al. (2025), "ZClip: Adaptive Spike
        Mitigation for LLM Pre-Training".
    """
    mean, var, count, warm_sum, warm_sumsq = state
    norm = global_norm(grads)
    finite = ops.isfinite(norm)
    in_warmup = count < warmup
    std = ops.sqrt(ops.maximum(var, 0.0))
    z = (norm - mean) / ops.maximum(std, 1e-12)
    spike = ops.logical_and(ops.logical_not(in_warmup), z > zscore)
    target = mean + (zscore * zscore / ops.maximum(z, 1e-12)) * std
    applied = ops.where(spike, target, norm)
    clipped = clip_by_global_norm(grads, applied, norm=norm)
    # Statistics: warm-up sums, then (at the last warm-up step) mean/var, then EMA.
    warming = ops.logical_and(in_warmup, finite)
    warm_sum = ops.where(warming, warm_sum + norm, warm_sum)
    warm_sumsq = ops.where(warming, warm_sumsq + norm * norm, warm_sumsq)
    new_count = ops.where(finite, count + 1, count)
    w = float(max(warmup, 1))
    warm_mean = warm_sum / w
    warm_var = ops.maximum(warm_sumsq / w - warm_mean * warm_mean, 0.0)
    ema_mean = alpha * mean + (1 - alpha) * applied
    ema_var = alpha * var + (1 - alpha) * ops.square(applied - ema_mean)
    ends_warmup = ops.logical_and(warming, ops.equal(new_count, warmup))
    after = ops.logical_and(ops.logical_not(in_warmup), finite)
    mean = ops.where(ends_warmup, warm_mean, ops.where(after, ema_mean, mean))
    var = ops.where(ends_warmup, warm_var, ops.where(after, ema_var, var))
    return clipped, (mean, var, new_count, warm_sum, warm_sumsq)


@keras.saving.register_keras_serializable(package="keras_gradtools")
class ClippedOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer with gradient clipping, applied to the summed gradient.

    Built like Keras' `LossScaleOptimizer`: it holds an `inner_optimizer`,
    clips the gradients it receives with one of the functions of this
    module, then lets the inner optimizer apply them. The stateful methods
    keep their state in optimizer variables, so it is saved and restored
    with the model (`model.save()` / `load_model()`) and training resumes
    with the same clipping. Under `mixed_float16`, Keras wraps this
    optimizer in a `LossScaleOptimizer`, which unscales the gradients before
    they reach here: clipping always sees unscaled gradients.

    Under `tf.distribute` with several replicas (MirroredStrategy,
    MultiWorkerMirroredStrategy) the clipping is applied to the all-reduced
    gradient, as it leaves the inner optimizer's all-reduce: the global norm
    is the global gradient's, and no extra all-reduce is added. That is why
    it also takes `"value"`, `"norm"` and `"global_norm"`: Keras' own
    arguments clip each replica's share before the sum.

    `last_applied_norm` holds the global gradient norm after clipping at
    the latest step; `GradNormLogger` records the applied per-variable norms
    (`applied_history`).

    Args:
        inner_optimizer: the Keras optimizer that applies the updates.
        clip: `"value"`, `"norm"`, `"global_norm"`, `"agc"`, `"autoclip"`
            or `"zclip"`.
        threshold: the largest element, per-variable norm or global norm;
            AGC's clip factor, AutoClip's percentile, ZClip's z-score.
            Defaults to `None` (1.0, 1.0, 1.0, 0.01, 10, 2.5).
        eps: AGC's floor on weight norms. Defaults to `1e-3`.
        agc_skip_last_layer: leave the final layer unclipped, as the AGC
            paper does (the variables of the layer that owns the last
            variable with rank >= 2). Defaults to `True`.
        history_size: AutoClip's history length. Defaults to `10000`.
        alpha: ZClip's EMA weight. Defaults to `0.97`.
        warmup: ZClip's warm-up steps. Defaults to `25`.
        name: the optimizer's name. Defaults to `None`.

    Example:

    >>> opt = ClippedOptimizer(keras.optimizers.SGD(1.0), clip="zclip")
    >>> opt.get_config()["clip"]
    'zclip'
    """

    def __init__(self, inner_optimizer, clip, threshold=None, eps=1e-3,
                 agc_skip_last_layer=True, history_size=10000, alpha=0.97,
                 warmup=25, name=None, **kwargs):
        for arg in KERAS_CLIP_ARGUMENTS:
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"Only one of clip and {arg} can be set: set clipping on the "
                    f"ClippedOptimizer or on its inner optimizer, not both. "
                    f"Received: clip={clip!r}, {arg}={kwargs[arg]!r}"
                )
            kwargs.pop(arg, None)
        kwargs.pop("learning_rate", None)
        if clip not in _WRAPPER_METHODS:
            raise ValueError(
                f"`clip` must be one of {', '.join(map(repr, _WRAPPER_METHODS))}. "
                f"Received: clip={clip!r}"
            )
        _check_no_keras_clipping(inner_optimizer, clip)
        threshold = _DEFAULT_THRESHOLD[clip] if threshold is None else float(threshold)
        _check_threshold(clip, threshold)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.clip = clip
        self.threshold = threshold
        self.eps = eps
        self.agc_skip_last_layer = agc_skip_last_layer
        self.history_size = int(history_size)
        self.alpha = alpha
        self.warmup = int(warmup)
        self._applied_hooks = []
        self._reduced_hooks = []
        self._owners = {}
        # Several replicas: the all-reduce happens in the innermost
        # optimizer, and clipping the sum means acting as it leaves it. The
        # hook is patched in while `apply` runs (every replica's, counted)
        # and taken out after: the inner optimizer is never changed for good.
        self._clip_sum = None
        if _on_tensorflow():
            self._clip_sum = internals.patch_all_reduce(
                layout(inner_optimizer).base,
                lambda all_reduce: functools.partial(self._reduce_and_clip, all_reduce))

    def add_applied_hook(self, hook):
        """Calls `hook(clipped_grads, variables)` at every step, as it clips."""
        self._applied_hooks.append(hook)

    def remove_applied_hook(self, hook):
        if hook in self._applied_hooks:
            self._applied_hooks.remove(hook)

    def add_reduced_hook(self, hook):
        """Several replicas: calls `hook(grads_and_vars)` with the sum, before it is clipped."""
        self._reduced_hooks.append(hook)

    def remove_reduced_hook(self, hook):
        if hook in self._reduced_hooks:
            self._reduced_hooks.remove(hook)

    def build(self, var_list):
        if self.built:
            return
        zeros = keras.initializers.Zeros()
        # Written in replica context with the same (all-reduced) values on
        # every replica: the first replica's write stands for all. Norms are
        # float32 whatever `keras.config.floatx()` is.
        add = functools.partial(self.add_variable, initializer=zeros,
                                aggregation="only_first_replica")
        self.last_applied_norm = add((), dtype="float32", name="last_applied_norm")
        if self.clip == "autoclip":
            self.clip_history = add((self.history_size,), dtype="float32",
                                    name="clip_history")
            self.clip_count = add((), dtype=_count_dtype(), name="clip_count")
        elif self.clip == "zclip":
            self.z_state = [add((), dtype="float32", name=n)
                            for n in ("z_mean", "z_var", "z_warm_sum", "z_warm_sumsq")]
            self.clip_count = add((), dtype=_count_dtype(), name="clip_count")
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def clip_gradients(self, grads, trainable_variables):
        """Clips `grads` with this optimizer's method, updating its state."""
        grads = list(grads)
        if self.clip == "value":
            grads = clip_by_value(grads, self.threshold)
        elif self.clip == "norm":
            grads = clip_by_norm(grads, self.threshold)
        elif self.clip == "global_norm":
            grads = clip_by_global_norm(grads, self.threshold)
        elif self.clip == "agc":
            skip = _last_layer_indices(trainable_variables) if self.agc_skip_last_layer else ()
            grads = adaptive_clip(grads, trainable_variables, self.threshold, self.eps, skip)
        elif self.clip == "autoclip":
            grads, (history, count) = autoclip(
                grads, (self.clip_history.value, self.clip_count.value), self.threshold
            )
            self.clip_history.assign(history)
            self.clip_count.assign(count)
        else:
            mean, var, warm_sum, warm_sumsq = (v.value for v in self.z_state)
            grads, state = zclip(
                grads, (mean, var, self.clip_count.value, warm_sum, warm_sumsq),
                zscore=self.threshold, alpha=self.alpha, warmup=self.warmup,
            )
            mean, var, count, warm_sum, warm_sumsq = state
            for variable, value in zip(self.z_state, (mean, var, warm_sum, warm_sumsq)):
                variable.assign(value)
            self.clip_count.assign(count)
        self.last_applied_norm.assign(global_norm(grads))
        return grads

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        variables = (list(trainable_variables) if trainable_variables is not None
                     else internals.optimizer_variables(self.inner_optimizer))
        if _replicas() > 1:
            internals.check_replicas_supported(_replicas())
            # Each replica holds its share of the gradient here: the sum is
            # clipped as it leaves the inner optimizer's all-reduce
            # (`_reduce_and_clip`).
            self._owners = {}
            for variable in variables:
                for handle in internals.variable_handles(variable):
                    self._owners[id(handle)] = variable
            with self._clip_sum:
                self.inner_optimizer.apply(grads, trainable_variables)
            return
        self.inner_optimizer.apply(self._clip_and_announce(grads, variables),
                                   trainable_variables)

    def _reduce_and_clip(self, all_reduce, grads_and_vars):
        """The inner optimizer's all-reduce, then (several replicas) the clipping of the sum."""
        grads_and_vars = list(all_reduce(grads_and_vars))
        if _replicas() == 1:
            return grads_and_vars
        for hook in list(self._reduced_hooks):
            hook(grads_and_vars)
        present = [i for i, (g, _) in enumerate(grads_and_vars) if g is not None]
        owned = [self._owners.get(id(grads_and_vars[i][1]), grads_and_vars[i][1])
                 for i in present]
        clipped = self._clip_and_announce([grads_and_vars[i][0] for i in present], owned)
        for i, g in zip(present, clipped):
            grads_and_vars[i] = (g, grads_and_vars[i][1])
        return grads_and_vars

    def _clip_and_announce(self, grads, variables):
        clipped = self.clip_gradients(grads, variables)
        for hook in list(self._applied_hooks):
            hook(clipped, variables)
        return clipped

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @iterations.setter
    def iterations(self, value):
        # Keras 3.3's base optimizer assigns a counter of its own in
        # `__init__`; the inner optimizer's is the one that counts.
        self._own_iterations = value

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "clip": self.clip,
            "threshold": self.threshold,
            "eps": self.eps,
            "agc_skip_last_layer": self.agc_skip_last_layer,
            "history_size": self.history_size,
            "alpha": self.alpha,
            "warmup": self.warmup,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _replicas():
    if not _on_tensorflow():
        # JAX under keras.distribution.DataParallel: `apply` sees the global
        # gradient already; other distributions are refused (tap.check_backend).
        return 1
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else (
        tf.distribute.get_strategy().num_replicas_in_sync)


def _last_layer_indices(variables):
    """Positions of the variables of the layer owning the last rank>=2 variable."""
    variables = list(variables)
    last = None
    for i, v in enumerate(variables):
        if len(v.shape) >= 2:
            last = i
    if last is None:
        return ()
    layer = norms_lib.variable_key(variables[last]).rsplit("/", 1)[0]
    return tuple(i for i, v in enumerate(variables)
                 if norms_lib.variable_key(v).rsplit("/", 1)[0] == layer)


def _check_threshold(clip, threshold):
    if clip == "autoclip":
        ok = 0.0 <= threshold <= 100.0
        what = "a percentile in [0, 100]"
    else:
        ok = threshold > 0 and np.isfinite(threshold)
        what = "a positive number"
    if not ok:
        raise ValueError(
            f"`threshold` for clip={clip!r} must be {what}. Received: threshold={threshold!r}"
        )


def _check_no_keras_clipping(optimizer, clip):
    for arg, value in layout(optimizer).keras_clipping.items():
        raise ValueError(
            f"Only one of clip and {arg} can be set: the inner optimizer already "
            f"clips with {arg}. Received: clip={clip!r}, {arg}={value!r}"
        )


def clipped_optimizer(optimizer="adam", learning_rate=1e-3, clip="norm", threshold=None,
                      **kwargs):
    """A ready optimizer with the chosen gradient clipping.

    `"none"`, `"value"`, `"norm"` and `"global_norm"` give a stock Keras
    optimizer with its own `clipvalue` / `clipnorm` / `global_clipnorm`
    (serialized like any Keras optimizer); `"agc"`, `"autoclip"` and
    `"zclip"` give a `ClippedOptimizer` around it. Called inside the scope
    of a `tf.distribute` strategy with several replicas, every method but
    `"none"` gives a `ClippedOptimizer`, which clips the summed gradient
    (Keras' own arguments would clip each replica's share).

    | clip | threshold means | default |
    |---|---|---|
    | `value` | largest absolute gradient element | 1.0 |
    | `norm` | largest L2 norm of each variable's gradient | 1.0 |
    | `global_norm` | largest L2 norm of all gradients together | 1.0 |
    | `agc` | clip factor lambda (unit-wise, relative to weight norms) | 0.01 |
    | `autoclip` | percentile of the history of global norms | 10 |
    | `zclip` | z-score above which a step is scaled back | 2.5 |

    Args:
        optimizer: a Keras optimizer name (`"adam"`, `"sgd"`, ...).
            Defaults to `"adam"`.
        learning_rate: the learning rate. Defaults to `1e-3`.
        clip: one of `CLIP_METHODS`. Defaults to `"norm"`.
        threshold: see the table. Defaults to `None` (the table's default).
        **kwargs: more arguments of the Keras optimizer, or of
            `ClippedOptimizer` (`eps`, `history_size`, `alpha`, `warmup`,
            `agc_skip_last_layer`).

    Returns:
        A Keras optimizer.

    Raises:
        ValueError: for an unknown `clip` or optimizer, a bad threshold, or
            two clip options at once (named in Keras' wording).

    Example:

    >>> opt = clipped_optimizer("adam", learning_rate=1e-3, clip="norm", threshold=1.0)
    >>> type(opt).__name__, opt.clipnorm
    ('Adam', 1.0)
    """
    if clip not in CLIP_METHODS:
        raise ValueError(
            f"`clip` must be one of {', '.join(CLIP_METHODS)}. Received: clip={clip!r}"
        )
    wrapper_args = {k: kwargs.pop(k) for k in
                    ("eps", "history_size", "alpha", "warmup", "agc_skip_last_layer")
                    if k in kwargs}
    replicas = _replicas()
    internals.check_replicas_supported(replicas)
    if clip in _KERAS_ARGUMENT and replicas > 1:
        threshold = _DEFAULT_THRESHOLD[clip] if threshold is None else float(threshold)
        _check_threshold(clip, threshold)
        for arg in _KERAS_ARGUMENT.values():
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"Only one of clip and {arg} can be set. "
                    f"Received: clip={clip!r} and {arg}={kwargs[arg]!r}"
                )
    elif clip in _KERAS_ARGUMENT:
        own = _KERAS_ARGUMENT[clip]
        for arg in _KERAS_ARGUMENT.values():
            if kwargs.get(arg) is not None and arg != own:
                raise ValueError(
                    f"Only one of {', '.join(KERAS_CLIP_ARGUMENTS[:-1])} and "
                    f"{KERAS_CLIP_ARGUMENTS[-1]} can be set. "
                    f"Received: clip={clip!r} (sets {own}) and {arg}={kwargs[arg]!r}"
                )
        threshold = _DEFAULT_THRESHOLD[clip] if threshold is None else float(threshold)
        _check_threshold(clip, threshold)
        kwargs[own] = threshold
    elif clip == "none" and threshold is not None:
        raise ValueError(f"clip='none' takes no threshold. Received: threshold={threshold!r}")
    try:
        inner = keras.optimizers.get(
            {"class_name": optimizer, "config": {"learning_rate": learning_rate, **kwargs}}
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"Unknown Keras optimizer or argument ({e}). Received: optimizer={optimizer!r}"
        ) from None
    if clip in ("agc", "autoclip", "zclip") or (clip in _KERAS_ARGUMENT and replicas > 1):
        return ClippedOptimizer(inner, clip=clip, threshold=threshold, **wrapper_args)
    return inner


def parse_clip(text):
    """Parses `METHOD[:THRESHOLD]` as given to `--clip`.

    Example:

    >>> parse_clip("norm:0.5"), parse_clip("zclip")
    (('norm', 0.5), ('zclip', None))
    """
    method, _, value = text.partition(":")
    method = method.strip()
    if method not in CLIP_METHODS:
        raise ValueError(
            f"`clip` must be one of {', '.join(CLIP_METHODS)} (optionally "
            f"METHOD:THRESHOLD). Received: clip={text!r}"
        )
    if not value:
        return method, None
    try:
        return method, float(value)
    except ValueError:
        raise ValueError(
            f"The threshold after ':' must be a number. Received: clip={text!r}"
        ) from None


# ----------------------------------------------------------------------
# What an optimizer is, and how it clips: the one answer
# ----------------------------------------------------------------------

OptimizerLayout = collections.namedtuple(
    "OptimizerLayout", ["loss_scale", "clipper", "base", "keras_clipping"])
OptimizerLayout.__doc__ = """The wrappers around an optimizer, outside in.

Attributes:
    loss_scale: the `keras.optimizers.LossScaleOptimizer`, or `None`.
    clipper: the `ClippedOptimizer`, or `None`.
    base: the optimizer that updates the weights (and, under
        `tf.distribute`, all-reduces the gradients): the innermost one.
    keras_clipping: dict of Keras' own clipping arguments set on the
        optimizer that clips (`{"clipnorm": 1.0}`), empty if none.
"""


def layout(optimizer):
    """Unwraps an optimizer: loss scaling, `ClippedOptimizer`, the base optimizer.

    Args:
        optimizer: a Keras optimizer.

    Returns:
        An `OptimizerLayout`.

    Example:

    >>> opt = keras.optimizers.LossScaleOptimizer(clipped_optimizer(clip="zclip"))
    >>> found = layout(opt)
    >>> type(found.clipper).__name__, type(found.base).__name__, found.keras_clipping
    ('ClippedOptimizer', 'Adam', {})
    >>> layout(keras.optimizers.Adam(clipnorm=1.0)).keras_clipping
    {'clipnorm': 1.0}
    """
    loss_scale = clipper = None
    while True:
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and loss_scale is None:
            loss_scale = optimizer
        elif isinstance(optimizer, ClippedOptimizer) and clipper is None:
            clipper = optimizer
        else:
            break
        optimizer = optimizer.inner_optimizer
    keras_clipping = {}
    if clipper is None:
        for arg in KERAS_CLIP_ARGUMENTS:
            value = getattr(optimizer, arg, None)
            if value is not None:
                keras_clipping[arg] = value
    return OptimizerLayout(loss_scale, clipper, optimizer, keras_clipping)


def clips(optimizer):
    """Whether an optimizer clips its gradients (Keras' arguments or a `ClippedOptimizer`)."""
    if optimizer is None:
        return False
    found = layout(optimizer)
    return found.clipper is not None or bool(found.keras_clipping)


def describe_clipping(optimizer):
    """A short description of an optimizer's gradient clipping, or `None`.

    Example:

    >>> describe_clipping(keras.optimizers.Adam(clipnorm=1.0))
    'clipnorm=1'
    >>> describe_clipping(keras.optimizers.LossScaleOptimizer(clipped_optimizer(clip="zclip")))
    'zclip(2.5)'
    """
    if optimizer is None:
        return None
    found = layout(optimizer)
    if found.clipper is not None:
        return f"{found.clipper.clip}({found.clipper.threshold:g})"
    return ", ".join(f"{k}={v:g}" for k, v in found.keras_clipping.items()) or None


def loss_scale_of(optimizer):
    """Returns the factor by which an optimizer scales the loss, or `None`.

    Gradients taken from a scaled loss are scaled by the same factor; the
    recorded norms divide it out so that they are those of the true
    gradient. A `LossScaleOptimizer` (what `compile()` wraps the optimizer
    in under the `mixed_float16` policy) scales by its current
    `dynamic_scale`; any Keras optimizer may also have a static
    `loss_scale_factor`.

    Args:
        optimizer: a Keras optimizer, or `None`.

    Returns:
        A scalar (tensor or float), or `None` when the loss is not scaled.
    """
    if optimizer is None:
        return None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # Mirrors LossScaleOptimizer.scale_loss: the constant initial scale
        # until the optimizer is built, its variable after.
        if optimizer.built:
            return optimizer.dynamic_scale
        return optimizer.initial_scale
    return getattr(optimizer, "loss_scale_factor", None)
