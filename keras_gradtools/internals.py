"""Every contact keras_gradtools has with Keras', TensorFlow's and PyTorch's insides.

This is the only module that imports `keras.src` or `tensorflow.python`,
reads or writes a private attribute of a Keras object, replaces a Keras
method, or calls a private PyTorch function. Everything else in the package
uses public API and calls the functions below. A new Keras (or PyTorch)
release that breaks the toolkit should break here, and only here.

Contact points (tested on Keras 3.3.3 / TF 2.16.2 and Keras 3.15.1 / TF
2.21.0, where `.ci/run` runs the whole suite; several replicas also on Keras
3.8.0 / TF 2.18.1, and refused before 3.8: see `check_replicas_supported`):

| contact | why | public alternative |
|---|---|---|
| `optimizer.apply`, replaced on the instance while a train function is traced (`patch_apply`) | the tap: the gradients the optimizer applies, after `compile()`'s loss scaling, inside the compiled step of the stock `fit()`; under several `tf.distribute` replicas only for update-to-weight ratios (the weights before and after it, in the replica) | none: Keras' `fit()` hands the gradients straight to `apply_gradients`; an optimizer wrapper (as `LossScaleOptimizer`) would have to replace `model.optimizer`, which is saved with the model |
| `optimizer._all_reduce_sum_gradients` (TF optimizer), replaced on the instance while traced (`patch_all_reduce`) | under `tf.distribute` with several replicas: the summed gradient, once, as it leaves the all-reduce that Keras already does (the logger records it; `ClippedOptimizer` clips it) | `replica_context.all_reduce` in our own code, at the price of a second all-reduce |
| `LossScaleOptimizer._stateful_handle_non_finite_grads`, replaced while traced (`patch_non_finite_handler`) | several replicas: the step the loss-scale optimizer skips never reaches the all-reduce; this is where it says so | none |
| `LossScaleOptimizer._stateless_handle_non_finite_grads`, replaced while traced on JAX (`patch_stateless_non_finite_handler`) | JAX with mixed_float16: a skipped step never reaches the inner optimizer's `apply`; this is where the recorders write its row (NaN, flagged) | none |
| `layer._inbound_nodes[0]`: its `arguments` and `output_tensors` (`first_call`) | the activation probe reads the layers of a model nested in the user's (a `keras.applications` base, a keras-hub backbone) through a model of their own, called on the tensor that feeds the nested model in the outer graph | none: a nested Functional model's public `input` / `output` are its own graph's |
| `layer._flatten_layers(include_self=False, recursive=...)` (`sublayers`) | the activation probe finds the layers inside the user's own layers and subclassed models (sublayers kept as private attributes too, as keras-hub's blocks keep them), and `gradtools check` whether a model holds batch normalization anywhere: what Keras' `Model.layers` reads | none for a `Layer`; a model's public `layers` |
| `layer.call`, replaced on the instance while the probe runs the model forward (`patch_call`) | the outputs of the layers inside the user's own layers and subclassed models, which no graph exposes | none: Keras 3 has no forward hooks |
| `layer.activation`, replaced on the instance while the probe runs the model forward (`patch_activation`) | a GELU or SiLU fused into a layer (`Dense(..., activation="gelu")`): its derivative needs its input, which only the layer's `call` sees | none (a public attribute, but Keras does not document replacing it) |
| `optimizer._trainable_variables` (`optimizer_variables`) | `apply(grads)` called without variables applies to these | none |
| `optimizer._clip_gradients` (`keras_clip`) | the gradients Keras' own `clipnorm` / `clipvalue` / `global_clipnorm` leave, to record the applied norms | re-implementing Keras' clipping (it would drift from Keras') |
| the source of `keras.src.optimizers.base_optimizer.BaseOptimizer.apply` (`keras_clips_accumulated_mean`) | under `gradient_accumulation_steps` Keras up to 3.4 clips each batch's gradient, 3.5 on the accumulated mean (keras-team/keras#19998): the applied norms exist per step only in the first case | the version threshold 3.5.0 (the fallback where the source is not installed) |
| `optimizer._distribution_strategy` (`strategy_of`) | the strategy a TF optimizer was created under (a custom loop may run outside its scope) | `tf.distribute.get_strategy()` inside the scope |
| `model._call_has_training_arg`, `model._compute_loss` / `compute_loss`, `model._loss_tracker`, `keras.src.losses.loss.unscale_loss_for_distribution` (`forward`, `compute_loss`, `track_loss`) | `GradNormModel.train_step` does what Keras' TF `train_step` does, on every supported version (the `training` argument of `compute_loss` arrived in 3.3, `_compute_loss` and the unscaling later) | a train step that keeps its own loss metric (Keras' custom `train_step` guide); its `loss` would then not be Keras' |
| `tensorflow.python.ops.resource_variable_ops.ResourceVariable` (`local_variable`) | the ring buffer: a plain variable even inside `strategy.scope()` (written by one replica per worker) | none: `tf.Variable` inside a scope becomes a distributed variable |
| `model.train_function`, replaced for the duration of `fit()` (`set_train_function`) | the logger rebuilds the train function with the tap in it, and puts the old one back | a public attribute, but Keras does not document replacing it |
| `optimizer._variables`, extended for the duration of `fit()` on JAX (`adopt_variables`, `release_variables`; the inner optimizer's under a `LossScaleOptimizer`) | JAX's train step is a pure function of the state Keras passes in: a ring buffer written inside it survives only as part of that state, and the optimizer's variables are | none |
| `optimizer.save_own_variables` / `load_own_variables`, replaced on the instance while variables are adopted (`adopt_variables`) | a checkpoint saved during a JAX `fit()` (`ModelCheckpoint`, `BackupAndRestore`) must hold the optimizer's own variables only, and load into an optimizer that holds the adopted ones: else Keras skips the whole optimizer state on load (a count mismatch) | none (public methods; replaced, not called privately) |
| `model._jax_state`, `model._jax_state_synced` (`live_values`) | during a JAX epoch the variables' own values are purged; the current ones live in the trainer's state | `model.jax_state_sync()` (public), which writes every variable back: too costly every few hundred steps |
| `torch._foreach_norm`, where torch lacks the public `torch.foreach.norm` (`torch_norms`) | PyTorch: every gradient's norm in one call (one multi-tensor kernel on a GPU) instead of one eager dispatch per variable | `torch.foreach.norm` (beta, newer torch: used when present); `torch.linalg.vector_norm` per tensor (used when neither exists) |

Every replacement made while a train step is traced, or while the probe runs
the model forward, goes through `Patch`:
entered and exited the same way, reference counted (replicas trace in
parallel threads), nested patches of one attribute compose in any order, and
the object is exactly as found once the last one exits. The one made for the
whole of a JAX `fit()` (an optimizer's `save_own_variables` /
`load_own_variables` while variables are adopted) is set by
`adopt_variables` and removed by `release_variables` with the last adopted
variable. Nothing here changes a user's object for good.
"""

import threading
import weakref

import keras

MINIMUM_KERAS = (3, 3, 0)
MINIMUM_TENSORFLOW = (2, 16, 0)
# Several replicas: Keras scales each replica's loss for the sum only from
# 3.8 on (keras-team/keras#20609), and all-reduces in replica context.
MINIMUM_KERAS_REPLICAS = (3, 8, 0)


def _version(text):
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


KERAS_VERSION = _version(keras.__version__)


def check_versions():
    """Raises `ImportError` naming the minimum if Keras or TensorFlow is too old.

    Returns:
        `None`.

    Raises:
        ImportError: for Keras older than 3.3.0 or TensorFlow older than
            2.16.0.
    """
    if KERAS_VERSION < MINIMUM_KERAS:
        raise ImportError(
            "keras_gradtools needs Keras >= 3.3.0 (tested on 3.3.3 and 3.15.1); "
            f"upgrade with `pip install -U keras`. Received: keras=={keras.__version__}"
        )
    if keras.backend.backend() != "tensorflow":
        return  # JAX and PyTorch run without TensorFlow
    from importlib import metadata

    try:
        tf_version = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        return  # a TensorFlow build under another name: Keras imported it already
    if _version(tf_version) < MINIMUM_TENSORFLOW:
        raise ImportError(
            "keras_gradtools needs TensorFlow >= 2.16.0 (tested on 2.16.2 and 2.21.0); "
            f"upgrade with `pip install -U tensorflow`. Received: tensorflow=={tf_version}"
        )


def check_replicas_supported(replicas):
    """Raises `ValueError` for several replicas on a Keras older than 3.8.

    Args:
        replicas: the number of replicas in sync.

    Returns:
        `None`.
    """
    if replicas > 1 and KERAS_VERSION < MINIMUM_KERAS_REPLICAS:
        raise ValueError(
            "keras_gradtools records and clips under tf.distribute with several replicas "
            "from Keras 3.8.0 on: older Keras all-reduces the gradients outside the "
            "replicas and does not scale each replica's loss for the sum "
            "(keras-team/keras#20609). Upgrade Keras, or train on one replica. "
            f"Received: keras=={keras.__version__} with {replicas} replicas"
        )


# ----------------------------------------------------------------------
# Patches: the one way an attribute of a Keras object is replaced
# ----------------------------------------------------------------------

_MISSING = object()
_LOCK = threading.RLock()
# (id(target), name) -> [target, name, own attribute or _MISSING, active patches]
_ACTIVE = {}


class Patch:
    """Replaces one attribute of one object while entered.

    `make(original)` returns the replacement, given what the attribute
    resolves to without this patch (the bound method, or the replacement
    of a patch entered earlier on the same attribute). Entering twice (two
    replica threads) counts; the attribute is put back when the last of
    all the patches on it exits, whatever the order of the exits.

    Args:
        target: the object (an optimizer, a model).
        name: the attribute's name.
        make: `original -> replacement`.
    """

    def __init__(self, target, name, make):
        self.target, self.name, self.make = target, name, make
        self.depth = 0

    def __enter__(self):
        self.enter()
        return self

    def __exit__(self, *exc):
        self.exit()
        return False

    def enter(self):
        with _LOCK:
            self.depth += 1
            if self.depth > 1:
                return
            key = (id(self.target), self.name)
            if key not in _ACTIVE:
                own = self.target.__dict__.get(self.name, _MISSING)
                _ACTIVE[key] = [self.target, self.name, own, []]
            _ACTIVE[key][3].append(self)
            _rebuild(key)

    def exit(self):
        with _LOCK:
            if self.depth == 0:
                return
            self.depth -= 1
            if self.depth:
                return
            key = (id(self.target), self.name)
            entry = _ACTIVE[key]
            entry[3].remove(self)
            if entry[3]:
                _rebuild(key)
                return
            del _ACTIVE[key]
            target, name, own = entry[0], entry[1], entry[2]
            if own is _MISSING:
                target.__dict__.pop(name, None)
            else:
                setattr(target, name, own)


def _rebuild(key):
    target, name, own, patches = _ACTIVE[key]
    if own is _MISSING:
        target.__dict__.pop(name, None)
    else:
        setattr(target, name, own)
    for patch in patches:
        setattr(target, name, patch.make(getattr(target, name)))


def is_patched(target, name):
    """Whether a `Patch` currently replaces `target.name` (for tests)."""
    return (id(target), name) in _ACTIVE


def patch_apply(optimizer, make):
    """A `Patch` of `optimizer.apply(grads, trainable_variables=None)`."""
    return Patch(optimizer, "apply", make)


def patch_all_reduce(optimizer, make):
    """A `Patch` of a TF optimizer's all-reduce: `grads_and_vars -> grads_and_vars`."""
    return Patch(optimizer, "_all_reduce_sum_gradients", make)


def patch_non_finite_handler(optimizer, make):
    """A `Patch` of the `LossScaleOptimizer` method that handles a skipped step: `() -> None`."""
    return Patch(optimizer, "_stateful_handle_non_finite_grads", make)


def patch_stateless_non_finite_handler(optimizer, make):
    """JAX: a `Patch` of the `LossScaleOptimizer`'s skipped-step branch.

    `(optimizer_variables, trainable_variables) -> (trainable_variables,
    optimizer_variables)`, the values after the skipped step.
    """
    return Patch(optimizer, "_stateless_handle_non_finite_grads", make)


def patch_call(layer, make):
    """A `Patch` of a layer's `call(*args, **kwargs)` (what its `__call__` runs)."""
    return Patch(layer, "call", make)


def patch_activation(layer, make):
    """A `Patch` of a layer's `activation(x)` (what Keras' `Dense`, convolutions, ... apply
    last in their `call`)."""
    return Patch(layer, "activation", make)


def set_train_function(model, function):
    """Sets `model.train_function` (what `fit()` calls each step)."""
    model.train_function = function


# ----------------------------------------------------------------------
# JAX: state that survives the pure train step
# ----------------------------------------------------------------------


_ADOPTED = weakref.WeakKeyDictionary()  # optimizer -> the variables adopted into its state


def adopt_variables(optimizer, variables):
    """Makes `variables` part of the optimizer's state (JAX: carried through the train step).

    While any are adopted, the optimizer saves and loads its own variables
    only: a checkpoint written during `fit()` has the optimizer's usual
    layout, and one loaded during `fit()` (`BackupAndRestore`) fills them.
    """
    present = {id(v) for v in optimizer._variables}
    optimizer._variables.extend(v for v in variables if id(v) not in present)
    adopted = _ADOPTED.setdefault(optimizer, [])
    adopted.extend(v for v in variables if all(v is not a for a in adopted))
    if "save_own_variables" not in vars(optimizer):
        optimizer.save_own_variables = _without_adopted(optimizer, optimizer.save_own_variables)
        optimizer.load_own_variables = _without_adopted(optimizer, optimizer.load_own_variables)


def release_variables(optimizer, variables):
    """Takes `variables` out of the optimizer's state again (see `adopt_variables`)."""
    gone = {id(v) for v in variables}
    optimizer._variables[:] = [v for v in optimizer._variables if id(v) not in gone]
    adopted = [v for v in _ADOPTED.get(optimizer, ()) if id(v) not in gone]
    if adopted:
        _ADOPTED[optimizer] = adopted
        return
    _ADOPTED.pop(optimizer, None)
    for name in ("save_own_variables", "load_own_variables"):
        vars(optimizer).pop(name, None)


def _without_adopted(optimizer, method):
    """`method(store)` run with the adopted variables out of `optimizer._variables`."""
    def call(store):
        adopted = {id(v) for v in _ADOPTED.get(optimizer, ())}
        every = optimizer._variables[:]
        optimizer._variables[:] = [v for v in every if id(v) not in adopted]
        try:
            return method(store)
        finally:
            optimizer._variables[:] = every
    return call


def live_values(model, variables):
    """The current values of optimizer-owned variables, also in the middle of a JAX epoch.

    Between the steps of a JAX epoch Keras keeps the current state in the
    trainer (`model._jax_state`) and purges the variables' own values; read
    from there, by position in `optimizer.variables`, until it is synced.
    """
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        position = {id(v): i for i, v in enumerate(model.optimizer.variables)}
        values = state["optimizer_variables"]
        return [values[position[id(v)]] for v in variables]
    return [v.value for v in variables]


# ----------------------------------------------------------------------
# Private reads
# ----------------------------------------------------------------------


def first_call(layer):
    """The tensors of a layer's first call in a functional graph, or `None` if never called.

    Returns `(inputs, outputs)`, each a flat list of symbolic tensors: the
    first argument the layer was called with (its `inputs`) and what the call
    returned. For a model nested in another, this is where it sits in the
    outer graph; its public `input` / `output` are its own graph's.
    """
    nodes = getattr(layer, "_inbound_nodes", None)
    if not nodes:
        return None
    node = nodes[0]
    args, kwargs = node.arguments.args, node.arguments.kwargs
    inputs = args[0] if args else kwargs.get("inputs")
    if inputs is None:
        return None
    return keras.tree.flatten(inputs), list(node.output_tensors)


def sublayers(layer, recursive=False):
    """The layers `layer` tracks itself (kept as attributes, public or private, or in
    lists and dicts of them), in the order they were set; theirs too with `recursive`."""
    return list(layer._flatten_layers(include_self=False, recursive=recursive))


def optimizer_variables(optimizer):
    """The variables an optimizer applies `apply(grads)` to when given none."""
    return list(optimizer._trainable_variables)


def keras_clip(optimizer, grads):
    """The gradients after Keras' own `clipnorm` / `clipvalue` / `global_clipnorm`."""
    return optimizer._clip_gradients(grads)


def keras_clips_accumulated_mean():
    """Whether Keras' own clipping acts on the accumulated mean under `gradient_accumulation_steps`.

    Keras up to 3.4 clips each batch's gradient in `apply`, before
    accumulating it; from 3.5 (keras-team/keras#19998) it clips the mean of
    N batches' gradients once every N steps, inside
    `_backend_apply_gradients`. Read from Keras' own `apply`, or from the
    version where its source is not installed.
    """
    global _CLIPS_MEAN
    if _CLIPS_MEAN is None:
        import inspect

        from keras.src.optimizers.base_optimizer import BaseOptimizer

        try:
            _CLIPS_MEAN = "_clip_gradients" not in inspect.getsource(BaseOptimizer.apply)
        except (OSError, TypeError):  # no source (a .pyc-only install)
            _CLIPS_MEAN = KERAS_VERSION >= (3, 5, 0)
    return _CLIPS_MEAN


_CLIPS_MEAN = None


def strategy_of(optimizer):
    """The `tf.distribute` strategy a TF optimizer was created under, or `None`."""
    return getattr(optimizer, "_distribution_strategy", None)


def local_variable(initial, name):
    """A plain TF variable, created outside any trace, never a distributed one.

    Inside `strategy.scope()` a `tf.Variable` becomes a mirrored variable;
    the recorders' buffers are written by one replica per worker, so they
    are built as a `ResourceVariable` directly, past the scope's creators.
    """
    import tensorflow as tf
    from tensorflow.python.ops import resource_variable_ops

    with tf.init_scope():
        return resource_variable_ops.ResourceVariable(initial, trainable=False, name=name)


def variable_handles(variable):
    """The objects that may stand for one variable in a train step.

    A Keras variable on TensorFlow wraps a `tf.Variable` (`variable.value`);
    inside `apply` either may be handed over.
    """
    handles = [variable]
    if keras.backend.backend() != "tensorflow":
        return handles
    import tensorflow as tf

    value = getattr(variable, "value", None)
    if isinstance(value, tf.Variable):
        handles.append(value)
    return handles


def torch_norms(tensors):
    """The float32 2-norm of each torch tensor, as a tuple of 0-d tensors.

    The same numbers as `torch.linalg.vector_norm(t, dtype=torch.float32)`
    for each `t`, in one call: `torch.foreach.norm` where torch has it,
    else `torch._foreach_norm` (its older, private name), else one call per
    tensor. Call it under `torch.no_grad()`. A float64 tensor's norm is taken in
    float64 and then rounded to float32 (torch refuses to narrow a norm's input).
    """
    if not tensors:
        return ()
    import torch

    tensors = list(tensors)
    wide = {i for i, t in enumerate(tensors) if t.dtype == torch.float64}
    if not wide:
        return tuple(_torch_norms_function()(tensors))
    narrow = [i for i in range(len(tensors)) if i not in wide]
    norms = dict(zip(narrow, _torch_norms_function()([tensors[i] for i in narrow])
                     if narrow else ()))
    for i in wide:
        norms[i] = torch.linalg.vector_norm(tensors[i]).to(torch.float32)
    return tuple(norms[i] for i in range(len(tensors)))


def _torch_norms_function():
    """The function `torch_norms` calls, chosen once per process."""
    global _TORCH_NORMS
    if _TORCH_NORMS is not None:
        return _TORCH_NORMS
    import importlib

    import torch

    def per_tensor(tensors):
        return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]

    try:
        public = importlib.import_module("torch.foreach").norm
    except (ImportError, AttributeError):
        public = None
    private = getattr(torch, "_foreach_norm", None)
    if public is not None:
        def chosen(tensors):
            return public(tensors, ord=2, dtype=torch.float32)
    elif private is not None:
        def chosen(tensors):
            return private(tensors, 2, dtype=torch.float32)
        try:  # an older torch's _foreach_norm may take no dtype
            chosen([torch.ones(1, dtype=torch.float16)])
        except (TypeError, RuntimeError):
            chosen = per_tensor
    else:
        chosen = per_tensor
    _TORCH_NORMS = chosen
    return chosen


_TORCH_NORMS = None


# ----------------------------------------------------------------------
# What Keras' TF train step does, on every supported version
# ----------------------------------------------------------------------


def forward(model, x):
    """`model(x, training=True)`, or `model(x)` when `call` takes no `training`."""
    if getattr(model, "_call_has_training_arg", True):
        return model(x, training=True)
    return model(x)


def compute_loss(model, x, y, y_pred, sample_weight, training=True):
    """The model's loss, as Keras' own `train_step` (or `test_step`) computes it."""
    if hasattr(model, "_compute_loss"):  # newer Keras: `compute_loss` may lack `training`
        return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                   training=training)
    # Older Keras (3.3 among them): `compute_loss` takes no `training`.
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)


def track_loss(model, loss, x):
    """Updates the model's `loss` metric with one step's loss, as Keras does."""
    try:
        from keras.src.losses.loss import unscale_loss_for_distribution
    except ImportError:  # older Keras: the loss is not scaled for distribution
        def unscale_loss_for_distribution(value):
            return value
    batch = keras.ops.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]
    model._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=batch)


# Any use of the package imports this module first: too old a Keras stops here.
check_versions()
