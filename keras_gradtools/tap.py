"""The gradient tap: where the gradients the optimizer applies are caught.

One mechanism feeds every recorder, whoever asks for the recording:

- `GradientTap` catches, inside the traced train step, the gradients an
  optimizer is about to apply and hands them to its subscribers
  (`GradNormRecorder`s). One replica: the optimizer's `apply` (the
  gradients as `compile()`'s loss scaling left them, before the optimizer's
  own clipping). Several replicas (`tf.distribute`): the summed gradient as
  it leaves the optimizer's own all-reduce, once per worker. Its patches
  (see `keras_gradtools.internals`) are in place only while the tap is
  entered.
- `recording(optimizer, recorders)` enters a tap around a custom loop's
  train step.
- `instrument_model(model, recorders)` (what `GradNormLogger` uses) rebuilds
  a compiled model's train function so that a tap is entered whenever it
  is traced, and puts the previous one back afterwards.

Backends: the optimizer's `apply` is where every Keras trainer hands over
the gradients (TensorFlow and JAX inside the traced step, PyTorch eagerly),
so one replica needs nothing more on any backend. The TensorFlow specifics
(replicas, the all-reduce) are confined to `GradientTap.enter` and the
methods it installs; the JAX specific (the recorders' buffers carried in the
optimizer's state) to `_Instrumentation.adopt`.
"""

import functools

import numpy as np

import keras
from keras_gradtools._tensorflow import tf
from keras import ops

from keras_gradtools import clipping
from keras_gradtools import internals
from keras_gradtools.recorder import GradNormRecorder


SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
JAX_HINT = ("On JAX, GradNormLogger records during fit() what the optimizer applies, also "
            "from your own train_step when it applies with optimizer.stateless_apply.")


def check_backend(what="GradNormLogger", backends=SUPPORTED_BACKENDS, hint=""):
    """Raises `ValueError` unless Keras runs on a backend `what` supports.

    Called before any training work starts (`GradNormLogger`'s
    `on_train_begin`, `instrument_model`, `recording`).

    Args:
        what: the feature, for the message. Defaults to `"GradNormLogger"`.
        backends: the backends it supports. Defaults to TensorFlow, JAX
            and PyTorch.
        hint: a sentence for the message: what to use instead. Defaults
            to `""`.

    Returns:
        `None`.

    Raises:
        ValueError: on another backend (NumPy, OpenVINO), or one `what`
            does not support yet; under a `keras.distribution` other than
            `DataParallel` on JAX.
    """
    backend = keras.backend.backend()
    if backend not in backends:
        raise ValueError(
            f"{what} runs on the {', '.join(backends)} backend(s) of Keras; set "
            f"KERAS_BACKEND before importing keras.{' ' + hint if hint else ''} Received: "
            f"keras.backend.backend()={backend!r}"
        )
    distribution = keras.distribution.distribution()
    if distribution is not None and not (
            backend == "jax" and isinstance(distribution, keras.distribution.DataParallel)):
        raise ValueError(
            f"{what} supports keras.distribution.DataParallel on JAX (every variable "
            "replicated: the optimizer applies the global gradient), not yet variables "
            f"sharded over devices. Received: distribution={type(distribution).__name__} on "
            f"{backend!r}"
        )


class GradientTap:
    """Makes an optimizer feed recorders the gradients it applies, while entered.

    Args:
        optimizer: the Keras optimizer.
        strategy: the `tf.distribute` strategy, or `None` for the one the
            optimizer was created under (else the current one). Defaults to
            `None`.

    Attributes:
        recorders: `GradNormRecorder`s fed the gradients as received (loss
            scale divided out, before clipping).
        applied_recorders: `GradNormRecorder`s fed the gradients after the
            optimizer's clipping (`ClippedOptimizer` or Keras' own
            arguments); nothing when the optimizer does not clip.
        update_recorders: `GradNormRecorder`s fed, per variable, the
            update-to-weight ratio `||w_after - w_before|| / ||w_before||`
            of the step the optimizer applied (NaN where `||w_before||` is
            0; 0 on a skipped step).
    """

    def __init__(self, optimizer, strategy=None):
        check_backend()
        self.optimizer = optimizer
        self.layout = clipping.layout(optimizer)
        self.recorders = []
        self.applied_recorders = []
        self.update_recorders = []
        self._entered = None
        self.replicas = self.local_replicas = 1
        # Whose `apply` is tapped. On JAX a LossScaleOptimizer applies through
        # its inner optimizer's `stateless_apply` (past its own `apply`), with
        # the gradients unscaled, on finite steps only: the inner one is
        # tapped, and the skipped branch writes its row itself.
        self.apply_target = optimizer
        self.jax_loss_scale = None
        if keras.backend.backend() == "jax" and self.layout.loss_scale is not None:
            self.jax_loss_scale = self.layout.loss_scale
            self.apply_target = self.layout.loss_scale.inner_optimizer
        if keras.backend.backend() != "tensorflow":
            return
        strategy = (strategy or internals.strategy_of(self.layout.base)
                    or tf.distribute.get_strategy())
        self.replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
        internals.check_replicas_supported(self.replicas)
        # Replicas of this worker: one recording per process, fed by this
        # worker's first replica (every replica sees the same reduced values).
        self.local_replicas = (
            len(strategy.extended.worker_devices) if self.replicas > 1 else 1
        )

    # ------------------------------------------------------------------
    # Installing and removing: one way, through `internals.Patch`
    # ------------------------------------------------------------------

    def enter(self):
        """Puts the tap in place (around the tracing of a train step)."""
        if self._entered is not None:
            return
        patches, hooks = [], []
        clipper = self.layout.clipper
        if self.replicas == 1:
            patches.append(internals.patch_apply(
                self.apply_target, lambda original: functools.partial(self._apply, original)))
            if self.jax_loss_scale is not None:
                patches.append(internals.patch_stateless_non_finite_handler(
                    self.jax_loss_scale,
                    lambda original: functools.partial(self._stateless_skipped, original)))
        else:
            if clipper is not None:
                # A ClippedOptimizer hands over the sum before it clips it.
                hooks.append((clipper.add_reduced_hook, clipper.remove_reduced_hook,
                              self._record_reduced))
            else:
                patches.append(internals.patch_all_reduce(
                    self.layout.base,
                    lambda original: functools.partial(self._reduced, original)))
            if self.layout.loss_scale is not None:
                patches.append(internals.patch_non_finite_handler(
                    self.layout.loss_scale,
                    lambda original: functools.partial(self._skipped, original)))
            if self.update_recorders:
                patches.append(internals.patch_apply(
                    self.apply_target,
                    lambda original: functools.partial(self._apply_replica, original)))
        if clipper is not None and self.applied_recorders:
            hooks.append((clipper.add_applied_hook, clipper.remove_applied_hook,
                          self._record_applied))
        for patch in patches:
            patch.enter()
        for add, _, hook in hooks:
            add(hook)
        self._entered = (patches, hooks)

    def exit(self):
        """Takes the tap out; the optimizer is exactly as found."""
        if self._entered is None:
            return
        patches, hooks = self._entered
        self._entered = None
        for _, remove, hook in hooks:
            remove(hook)
        for patch in reversed(patches):
            patch.exit()

    # ------------------------------------------------------------------
    # What the installed methods do (inside the traced step)
    # ------------------------------------------------------------------

    def _apply(self, apply, grads, trainable_variables=None):
        """The optimizer's `apply` (one replica): record what it got, then apply it."""
        grads = list(grads)
        if not grads:
            # A model with no trainable variable: Keras' TensorFlow and PyTorch
            # trainers skip `apply` then, its JAX trainer calls it. No row either way.
            return apply(grads, trainable_variables)
        if trainable_variables is None:
            variables = internals.optimizer_variables(self.apply_target)
        else:
            trainable_variables = list(trainable_variables)
            variables = trainable_variables
        for recorder in self.recorders + self.applied_recorders + self.update_recorders:
            # A model built in its traced step (TensorFlow): its variables now exist.
            recorder.bind(variables)
        scale = clipping.loss_scale_of(self.apply_target)
        # The norms are taken first and each variable's update is ordered
        # after its gradient's norm (see `ordered_after`); they are written
        # once the step's verdict is known.
        shared = {}
        pending = [(recorder, recorder.step_norms(grads, variables, scale, shared))
                   for recorder in self.recorders]
        grads = ordered_after(shared, grads)
        skipped = None
        if self.layout.loss_scale is not None and self.jax_loss_scale is None:
            # The loss-scale optimizer skips a step whose scaled gradients
            # are not all finite: its own public test, on the same gradients.
            skipped = ops.logical_not(self.layout.loss_scale.check_finite(grads))
        before = [(recorder, update_snapshot(recorder.variables))
                  for recorder in self.update_recorders]
        result = apply(grads, trainable_variables)
        for recorder, norms in pending:
            recorder.write(norms, skipped)
        for recorder, values in before:
            recorder.write(update_ratios(values, recorder.variables), skipped)
        if self.applied_recorders and self.layout.keras_clipping:
            unscaled = grads if scale is None else [
                None if g is None else g / ops.cast(scale, g.dtype) for g in grads
            ]
            present = [(g, v) for g, v in zip(unscaled, variables) if g is not None]
            clipped = internals.keras_clip(self.layout.base, [g for g, _ in present])
            self._record_applied(clipped, [v for _, v in present], skipped)
        elif self.applied_recorders and skipped is not None:
            # A ClippedOptimizer writes its applied row from inside its own
            # `apply`, which the loss-scale optimizer does not call on a skipped
            # step: that step's row (NaN, flagged) is written here.
            self._write_skipped_if(skipped, self.applied_recorders)
        return result

    @staticmethod
    def _write_skipped_if(skipped, recorders):
        """Writes a skipped row to each recorder when `skipped` (a boolean tensor) holds."""
        def write():
            for recorder in recorders:
                recorder.write_skipped()
            return ops.convert_to_tensor(True)

        if keras.backend.backend() == "tensorflow":
            tf.cond(skipped, write, lambda: tf.constant(False))
        elif bool(skipped):  # PyTorch runs eagerly
            write()

    def _apply_replica(self, apply, grads, trainable_variables=None):
        """Several replicas: the optimizer's `apply` in a replica, with the update it made.

        The weights are read in the replica before and after `apply` (whose
        update, made in a merge call, reaches every replica's copy): the
        ratio is the update the all-reduced gradient made, the same on every
        replica, written by this worker's first one. Under a loss-scale
        optimizer a step that changed no recorded weight is recorded as
        skipped.
        """
        if not self._recording_replica():
            return apply(grads, trainable_variables)
        before = [(recorder, update_snapshot(recorder.variables))
                  for recorder in self.update_recorders]
        result = apply(grads, trainable_variables)
        for recorder, values in before:
            ratios = update_ratios(values, recorder.variables)
            skipped = None
            if self.layout.loss_scale is not None:
                skipped = ops.logical_not(ops.any(ops.greater(ratios, 0.0)))
            recorder.write(ratios, skipped)
        return result

    def _stateless_skipped(self, handle_non_finite, optimizer_variables, trainable_variables):
        """JAX, a loss-scale optimizer's skipped step: its row is written, NaN and flagged."""
        trainable_variables, optimizer_variables = handle_non_finite(
            optimizer_variables, trainable_variables)
        state = self.jax_loss_scale.variables
        with keras.StatelessScope(state_mapping=list(zip(state, optimizer_variables))) as scope:
            for recorder in self.recorders + self.applied_recorders + self.update_recorders:
                recorder.write_skipped()
        return trainable_variables, [scope.get_current_value(v) for v in state]

    def _record_applied(self, grads, variables, skipped=None):
        if not self._recording_replica():
            return
        shared = {}
        for recorder in self.applied_recorders:
            recorder.write(recorder.step_norms(grads, variables, None, shared), skipped)

    def _recording_replica(self):
        """Whether the replica being traced writes this worker's recording."""
        if self.replicas == 1:
            return True
        context = tf.distribute.get_replica_context()
        if context is None:  # cross-replica context: one call for all replicas
            return True
        replica = tf.get_static_value(context.replica_id_in_sync_group)
        if replica is None:
            raise ValueError(
                "keras_gradtools needs a static replica id to record under "
                f"{type(tf.distribute.get_strategy()).__name__}; use "
                "MirroredStrategy or MultiWorkerMirroredStrategy."
            )
        return int(replica) % self.local_replicas == 0

    def _reduced(self, all_reduce, grads_and_vars):
        """The optimizer's all-reduce (several replicas), then record the sum."""
        grads_and_vars = all_reduce(grads_and_vars)
        self._record_reduced(grads_and_vars)
        return grads_and_vars

    def _record_reduced(self, grads_and_vars):
        if not self._recording_replica():
            return
        grads = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        shared = {}
        # Keras' own clipnorm/clipvalue/global_clipnorm act on each
        # replica's share before this sum: what is recorded here is then the
        # applied gradient, for both recordings.
        for recorder in self.recorders + (
            self.applied_recorders if self.layout.keras_clipping else []
        ):
            recorder.write(recorder.step_norms(grads, variables, None, shared))

    def _skipped(self, handle_non_finite):
        """The loss-scale optimizer skips a step (several replicas): record it as such."""
        result = handle_non_finite()
        if self._recording_replica():
            for recorder in self.recorders + self.applied_recorders:
                recorder.write_skipped()
        return result


def update_snapshot(variables):
    """The variables' values before the optimizer updates them (a copy on PyTorch)."""
    if keras.backend.backend() == "torch":
        return [v.value.detach().clone() for v in variables]
    if keras.backend.backend() == "tensorflow":
        # Read now: automatic control dependencies order this read before
        # the optimizer's assignment to the same variable.
        return [tf.identity(v.value) for v in variables]
    return [v.value for v in variables]  # JAX: immutable arrays, read in the scope


def update_ratios(before, variables):
    """`||w_after - w_before|| / ||w_before||` per variable, float32 (NaN where `w_before` is 0).

    Read after the optimizer's update: the variables' values now are
    `w_after`.
    """
    from keras_gradtools.norms import squared_norm

    if not variables:
        return ops.zeros((0,), "float32")
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            # All norms in one call each, as the recorder takes its own.
            steps = torch.stack(internals.torch_norms(
                [v.value.detach() - old for v, old in zip(variables, before)]))
            sizes = torch.stack(internals.torch_norms(before))
            return torch.where(sizes > 0, steps / sizes, torch.full_like(sizes, float("nan")))
    steps = ops.sqrt(ops.stack([squared_norm(ops.subtract(v.value, old))
                                for v, old in zip(variables, before)]))
    sizes = ops.sqrt(ops.stack([squared_norm(old) for old in before]))
    return ops.where(sizes > 0, steps / ops.where(sizes > 0, sizes, 1.0), np.nan)


def ordered_after(shared, gradients):
    """The gradients, each to be applied only once its own norm is computed.

    `shared` maps `id(gradient)` to the norm op a recorder made for it (see
    `GradNormRecorder.step_norms`). Each returned gradient is the same
    tensor passed through `tf.identity` under a control dependency on its
    norm, so the update that consumes it runs after the norm has read it;
    ordering per variable (not all updates after all norms) leaves the
    updates of the last layers free to run while earlier gradients are still
    being computed. Gradients without a norm (biases by default) pass
    unchanged. `docs/benchmarks.md` has the measurements behind this order.

    Args:
        shared: the dict given to `step_norms`.
        gradients: the gradients about to be applied.

    Returns:
        A list of gradients, in the same order.
    """
    if keras.backend.backend() != "tensorflow":
        return list(gradients)  # eager (PyTorch) or traced by XLA as a whole (JAX)
    ordered = []
    for gradient in gradients:
        norm = None if gradient is None else shared.get(id(gradient))
        if norm is None:
            ordered.append(gradient)
            continue
        with tf.control_dependencies([norm]):
            ordered.append(tf.identity(gradient))
    return ordered


class recording:
    """Context manager: `optimizer` feeds `recorders` the gradients it applies.

    For custom training loops on TensorFlow, including ones under
    `tf.distribute` (`strategy.run`): enter it around the calls of your
    `tf.function` train step (it must be active while the step is traced:
    the recording is built into the traced graph, and stays in it), and call
    `optimizer.apply(grads, variables)` in the step as usual. On PyTorch,
    enter it around the loop whose steps call `optimizer.apply`. Not on JAX,
    whose jitted steps carry their state explicitly: there `GradNormLogger`
    records during `fit()`, custom `train_step`s included. With several
    replicas the recorders get the all-reduced gradient (the one applied),
    written once per worker, not each replica's share; under a loss-scale
    optimizer, skipped steps are flagged (`GradNormRecorder.skipped`).

    Args:
        optimizer: the Keras optimizer the train step applies gradients with.
        recorders: `GradNormRecorder`s to feed (a list, or one).
        applied_recorders: `GradNormRecorder`s for the post-clipping
            gradients of a `ClippedOptimizer` (or Keras' own clipping).
            Defaults to `()`.
        strategy: the `tf.distribute` strategy, or `None` for the one the
            optimizer was created under. Defaults to `None`.

    Example:

    >>> import keras, tensorflow as tf
    >>> from keras_gradtools import GradNormRecorder
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="out")],
    ...                          name="net")
    >>> optimizer = keras.optimizers.SGD(0.1)
    >>> recorder = GradNormRecorder(model.trainable_variables)
    >>> @tf.function
    ... def step(x, y):
    ...     with tf.GradientTape() as tape:
    ...         loss = tf.reduce_mean((model(x) - y) ** 2)
    ...     grads = tape.gradient(loss, model.trainable_variables)
    ...     optimizer.apply(grads, model.trainable_variables)
    >>> with recording(optimizer, recorder):
    ...     step(tf.ones((4, 2)), tf.zeros((4, 1)))
    ...     step(tf.ones((4, 2)), tf.zeros((4, 1)))
    >>> recorder.history["net/out/kernel"].shape
    (2,)
    """

    def __init__(self, optimizer, recorders, applied_recorders=(), strategy=None):
        check_backend("recording()", ("tensorflow", "torch"), JAX_HINT)
        if isinstance(recorders, GradNormRecorder):
            recorders = [recorders]
        self._tap = GradientTap(optimizer, strategy)
        self._tap.recorders.extend(recorders)
        self._tap.applied_recorders.extend(applied_recorders)

    def __enter__(self):
        self._tap.enter()
        return self

    def __exit__(self, *exc):
        self._tap.exit()
        return False


def is_chief(strategy=None):
    """Whether this process writes a run's files (TensorBoard events, saved runs).

    `True` without a strategy and under MirroredStrategy; under
    MultiWorkerMirroredStrategy, only on the chief worker (TF's own rule:
    the `chief` task, or worker 0 when there is none).

    Args:
        strategy: a `tf.distribute.Strategy`, or `None` for the current one.
            Defaults to `None`.

    Returns:
        A bool.
    """
    strategy = strategy or tf.distribute.get_strategy()
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def instrument_model(model, recorders, applied_recorders=(), update_recorders=()):
    """Makes `model`'s train function record gradient norms into `recorders`.

    A `GradientTap` on the model's optimizer is entered *only while the
    train function runs* (so nothing is ever saved, copied or left
    patched): its `apply` first hands the very gradients it received
    (loss-scaled ones divided by the scale) to every recorder, then applies
    them unchanged. The model's own `train_step` is untouched. Call the
    returned `restore()` to put the model's previous train function back;
    it is also called automatically if the train function raises (an
    error, `KeyboardInterrupt`), and if a later `fit()` that does not carry
    these recorders calls it.

    Instrumenting a model that is already instrumented in the same `fit()`
    adds the recorders to the existing instrumentation: each gradient's
    norm is computed once and written to all of them.

    A model that records in its own `train_step` (it has a
    `gradtools_recorders` list, as `GradNormModel` does) gets the recorders
    appended to that list instead, on one replica; with several, its
    `train_step` holds one replica's share of the gradient, so the
    recorders get the sum from the optimizer, as for any model.

    `applied_recorders` get the norms of the gradients *after* the
    optimizer's clipping: a `ClippedOptimizer` hands them over as it clips;
    for Keras' own `clipnorm` / `clipvalue` / `global_clipnorm` they are
    computed with the optimizer's own clipping function. With no clipping
    configured they get nothing.

    Args:
        model: a compiled `keras.Model`.
        recorders: list of `GradNormRecorder` to feed.
        applied_recorders: list of `GradNormRecorder` for post-clip norms.
            Defaults to `()`.
        update_recorders: list of `GradNormRecorder` for the update-to-
            weight ratios (see `GradientTap`). Defaults to `()`.

    Returns:
        A function `restore()` that detaches these recorders.

    Raises:
        ValueError: if the model has no optimizer, or Keras runs on a backend
            (or under a `keras.distribution`) that `check_backend` refuses.
    """
    check_backend()
    recorders = list(recorders)
    applied_recorders = list(applied_recorders)
    update_recorders = list(update_recorders)
    strategy = None
    if keras.backend.backend() == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    native = getattr(model, "gradtools_recorders", None)
    if isinstance(native, list) and not update_recorders and (
            strategy is None or strategy.num_replicas_in_sync == 1):
        native.extend(recorders)
        model.make_train_function(force=True)

        def restore_native():
            for recorder in recorders:
                if recorder in native:
                    native.remove(recorder)
            internals.set_train_function(model, None)

        return restore_native

    if model.optimizer is None:
        raise ValueError(
            "The model has no optimizer: call `model.compile(optimizer=...)` "
            f"before `fit()`. Received: model={model.name!r}"
        )
    current = getattr(model.train_function, "gradtools_instrumentation", None)
    if current is None or not current.serves(model):
        current = _Instrumentation(model)
    current.tap.recorders.extend(recorders)
    current.tap.applied_recorders.extend(applied_recorders)
    current.tap.update_recorders.extend(update_recorders)
    current.adopt(recorders + applied_recorders + update_recorders)

    def restore():
        current.detach(recorders + applied_recorders + update_recorders)

    return restore


class _Instrumentation:
    """A train function that enters a tap while it runs; see `instrument_model`."""

    def __init__(self, model):
        self.model = model
        self.tap = GradientTap(model.optimizer, getattr(model, "distribute_strategy", None))
        self.adopted = []
        self.active = True
        self.previous = model.train_function
        self.history = getattr(model, "history", None)
        model.make_train_function(force=True)
        self.compiled = model.train_function

        def train_function(*args):
            return self.call(*args)

        train_function.gradtools_instrumentation = self
        self.train_function = train_function
        internals.set_train_function(model, train_function)

    def serves(self, model):
        """Whether this instrumentation belongs to `model`'s current `fit()`."""
        return (
            self.active
            and model.optimizer is self.tap.optimizer
            and getattr(model, "history", None) is self.history
        )

    def adopt(self, recorders):
        """JAX: the recorders' buffers join the optimizer's state, read from the trainer's."""
        if keras.backend.backend() != "jax":
            return
        for recorder in recorders:
            internals.adopt_variables(self.tap.apply_target, recorder.device_variables)
            recorder.read_values = functools.partial(internals.live_values, self.model)
            self.adopted.append(recorder)
        self._rebuild()

    def _rebuild(self):
        """JAX: a fresh train function for the new state (its shardings are fixed when made)."""
        self.model.make_train_function(force=True)
        self.compiled = self.model.train_function
        internals.set_train_function(self.model, self.train_function)

    def release(self, recorders):
        for recorder in recorders:
            if recorder in self.adopted:
                variables = recorder.device_variables
                # Keep what the trainer's state holds (also when an exception
                # ended the epoch before Keras synced it back). A train step
                # that failed before the trainer held any state left none.
                try:
                    values = internals.live_values(self.model, variables)
                except (TypeError, KeyError, IndexError):
                    values = []
                for variable, value in zip(variables, values):
                    variable.assign(value)
                internals.release_variables(self.tap.apply_target, variables)
                del recorder.read_values  # back to the recorder's own reading
                self.adopted.remove(recorder)

    def detach(self, recorders):
        self.release(recorders)
        for recorder in recorders:
            for group in (self.tap.recorders, self.tap.applied_recorders,
                          self.tap.update_recorders):
                if recorder in group:
                    group.remove(recorder)
        if not (self.tap.recorders or self.tap.applied_recorders or self.tap.update_recorders):
            self.restore()
        elif keras.backend.backend() == "jax" and self.active:
            self._rebuild()

    def restore(self):
        if not self.active:
            return
        self.active = False
        self.release(list(self.adopted))
        self.tap.recorders = []
        self.tap.applied_recorders = []
        self.tap.update_recorders = []
        if self.model.train_function is self.train_function:
            internals.set_train_function(self.model, self.previous)

    def call(self, *args):
        model = self.model
        if not self.active or getattr(model, "history", None) is not self.history:
            # A later fit() that does not carry these recorders.
            self.restore()
            model.make_train_function()
            return model.train_function(*args)
        self.tap.enter()
        try:
            return self.compiled(*args)
        except BaseException:
            self.restore()
            raise
        finally:
            self.tap.exit()
