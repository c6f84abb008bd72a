"""In-graph recording of gradient norms.

A `GradNormRecorder` keeps a ring buffer of per-step norms in `tf.Variable`s
that the compiled train step writes to; the host reads the buffer on its own
schedule (`flush()`), so recording costs no host round trip per step.

Three ways to feed a recorder, all from the gradients the optimizer applies:

- `GradNormLogger` (in `callbacks.py`) instruments any compiled model for the
  duration of `fit()` through `instrument_model()` below;
- `GradNormModel`, a `keras.Model` whose GradientTape train step records;
- a custom training loop calls `recorder.record(gradients, variables)`
  inside its own `tf.function`.
"""

import functools

import numpy as np
import tensorflow as tf
import keras
from tensorflow.python.ops import resource_variable_ops

from keras.src.losses.loss import unscale_loss_for_distribution as _unscale_loss_for_distribution

from keras_gradtools import norms as norms_lib

_DEFAULT_CAPACITY = 4096


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


class GradNormRecorder:
    """Records the L2 norm of each variable's gradient at every step.

    The norms live in a `(capacity, num_variables)` float32 ring buffer
    (`tf.Variable`) written inside the compiled train step; `flush()` copies
    the rows written since the last flush to the host. Flush at least every
    `capacity` steps: rows older than that are overwritten, and `flush()`
    then warns and records the lost steps as NaN so that step numbers stay
    right.

    The recorder is not tracked by any model: it is never saved with one.

    Args:
        variables: the variables whose gradients may be recorded, e.g.
            `model.trainable_variables`.
        include_biases: whether biases are recorded. Defaults to `False`.
        capacity: rows in the ring buffer. Defaults to `4096`.
        histogram_freq: also bucket each gradient's values every this many
            steps (0: never), for TensorBoard; read with `histograms()`.
            Defaults to `0`.
        histogram_buckets: buckets per histogram. Defaults to `30`.

    Example:

    >>> import keras, tensorflow as tf
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="out")],
    ...                          name="net")
    >>> recorder = GradNormRecorder(model.trainable_variables)
    >>> @tf.function
    ... def step(x, y):
    ...     with tf.GradientTape() as tape:
    ...         loss = tf.reduce_mean((model(x) - y) ** 2)
    ...     grads = tape.gradient(loss, model.trainable_variables)
    ...     recorder.record(grads, model.trainable_variables)
    >>> step(tf.ones((4, 2)), tf.zeros((4, 1)))
    >>> recorder.keys
    ['net/out/kernel']
    >>> recorder.history["net/out/kernel"].shape
    (1,)
    """

    def __init__(self, variables, include_biases=False, capacity=None,
                 histogram_freq=0, histogram_buckets=30):
        capacity = _DEFAULT_CAPACITY if capacity is None else capacity
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(
                "`capacity` must be a positive integer. "
                f"Received: capacity={capacity}"
            )
        self.include_biases = include_biases
        self.capacity = capacity
        self.variables = norms_lib.select_variables(variables, include_biases)
        self.keys = norms_lib.unique_keys(self.variables)
        self._index = {}
        for i, variable in enumerate(self.variables):
            for handle in _handles(variable):
                self._index[id(handle)] = i
        width = max(len(self.variables), 1)
        # One column per variable, then the step's "skipped" flag.
        self._buffer = _state_variable(tf.zeros([capacity, width + 1], tf.float32),
                                       "gradtools_norms")
        self._count = _state_variable(tf.constant(0, tf.int64), "gradtools_count")
        self.histogram_freq = int(histogram_freq or 0)
        self.histogram_buckets = int(histogram_buckets)
        if self.histogram_freq:
            slots = capacity // self.histogram_freq + 2
            self._hist = _state_variable(
                tf.zeros([slots, width, self.histogram_buckets, 3], tf.float32),
                "gradtools_histograms",
            )
            self._hist_steps = _state_variable(
                tf.fill([slots], tf.constant(-1, tf.int64)), "gradtools_histogram_steps"
            )
        self.reset()

    def reset(self):
        """Forgets everything recorded on the host; the counter restarts.

        Returns:
            `None`.
        """
        self._count.assign(0)
        if self.histogram_freq:
            self._hist_steps.assign(tf.fill(tf.shape(self._hist_steps), tf.constant(-1, tf.int64)))
        self._read = 0
        self._hist_read = 0
        self._chunks = []
        self._skip_chunks = []
        self.last_skipped = np.zeros(0, bool)
        self._cache = None

    # ------------------------------------------------------------------
    # Device side
    # ------------------------------------------------------------------

    def norms_of(self, gradients, variables, scale=None):
        """Returns this recorder's per-variable norms for one step.

        Gradients are matched to the recorder's variables by identity; a
        recorded variable that is absent from `variables`, or whose gradient
        is `None`, gets 0.

        Args:
            gradients: the gradients, one per variable.
            variables: the variables, in the same order.
            scale: the loss scale to divide out, or `None`. Defaults to
                `None`.

        Returns:
            A float32 tensor of shape `(len(self.keys),)`.
        """
        gradients, variables = _check_lengths(gradients, variables)
        return _norms_for(self, gradients, variables, scale, {})

    def record(self, gradients, variables, scale=None, skipped=None):
        """Writes one step's norms into the buffer (call in the train step).

        Args:
            gradients: the gradients the optimizer is about to apply.
            variables: the variables they belong to, in the same order.
            scale: the loss scale to divide out, or `None` when the loss is
                not scaled. Defaults to `None`.
            skipped: a boolean scalar, true when the optimizer does not
                apply this step (a loss-scale optimizer's overflow), or
                `None` for never. Defaults to `None`.

        Returns:
            The recorded norms, a float32 tensor of shape
            `(len(self.keys),)`.
        """
        gradients, variables = _check_lengths(gradients, variables)
        return self.record_step(gradients, variables, scale, skipped=skipped)

    def record_step(self, gradients, variables, scale=None, shared=None, skipped=None):
        """Records one step: norms every step, histograms every `histogram_freq`.

        Args:
            gradients: the gradients, one per variable.
            variables: the variables, in the same order.
            scale: the loss scale to divide out, or `None`. Defaults to
                `None`.
            shared: a dict that caches each gradient's norm between
                recorders of the same step. Defaults to `None`.
            skipped: see `record`. Defaults to `None`.

        Returns:
            The recorded norms.
        """
        norms = self.step_norms(gradients, variables, scale, shared)
        self.write(norms, skipped)
        return norms

    def step_norms(self, gradients, variables, scale=None, shared=None):
        """One step's norms (and histograms on their steps), not yet written.

        The first half of `record_step`: `write` the result once the step's
        `skipped` verdict is known.

        Args:
            gradients: the gradients, one per variable.
            variables: the variables, in the same order.
            scale: the loss scale to divide out, or `None`. Defaults to
                `None`.
            shared: see `record_step`. Defaults to `None`.

        Returns:
            A float32 tensor of shape `(len(self.keys),)`.
        """
        norms = _norms_for(self, gradients, variables, scale,
                           {} if shared is None else shared)
        if self.histogram_freq:
            step = self._count.read_value()
            slots = [None] * len(self.variables)
            for gradient, variable in zip(gradients, variables):
                i = self._lookup(variable)
                if i is not None and slots[i] is None:
                    slots[i] = gradient

            def write_histograms():
                rows = []
                for gradient, variable in zip(slots, self.variables):
                    rows.append(_histogram(gradient, variable, scale,
                                           self.histogram_buckets))
                slot = tf.math.floormod(step // self.histogram_freq,
                                        self._hist_steps.shape[0])
                index = tf.reshape(slot, [1, 1])
                self._hist.scatter_nd_update(index, tf.expand_dims(tf.stack(rows), 0))
                self._hist_steps.scatter_nd_update(index, tf.reshape(step, [1]))
                return tf.constant(True)

            tf.cond(tf.equal(tf.math.floormod(step, self.histogram_freq), 0),
                    write_histograms, lambda: tf.constant(False))
        return norms

    def histograms(self):
        """Histograms written since the last call: `[(step, {key: (B, 3) array})]`.

        Each array holds TensorBoard's `[left, right, count]` rows over the
        gradient's finite values (unscaled).
        """
        if not self.histogram_freq:
            return []
        steps = self._hist_steps.numpy()
        data = None
        out = []
        for slot in np.argsort(steps):
            step = int(steps[slot])
            if step < self._hist_read:
                continue
            data = self._hist.numpy() if data is None else data
            out.append((step, {k: data[slot, i] for i, k in enumerate(self.keys)}))
        if out:
            self._hist_read = out[-1][0] + 1
        return out

    def write(self, norms, skipped=None):
        """Writes an already computed norm vector as the next step's row.

        Args:
            norms: a float32 tensor of shape `(len(self.keys),)`.
            skipped: see `record`. Defaults to `None`.

        Returns:
            `None`.
        """
        if not self.variables:
            norms = tf.zeros([1], tf.float32)
        flag = tf.zeros([1], tf.float32) if skipped is None else tf.reshape(
            tf.cast(skipped, tf.float32), [1])
        row = tf.math.floormod(self._count.read_value(), self.capacity)
        written = self._buffer.scatter_nd_update(
            tf.reshape(tf.cast(row, tf.int64), [1, 1]),
            tf.reshape(tf.concat([tf.reshape(norms, [-1]), flag], 0), [1, -1]),
        )
        # The count moves only once the row is written: a step that fails
        # (a data error) leaves no phantom row behind.
        with tf.control_dependencies([written]):
            self._count.assign_add(1)

    def write_skipped(self):
        """Records a step that the optimizer skipped without norms: NaN, flagged.

        Used where the gradients of a skipped step never reach the recorder
        (a loss-scale optimizer under several replicas).

        Returns:
            `None`.
        """
        self.write(tf.fill([max(len(self.keys), 1)], np.nan), tf.constant(True))

    def _lookup(self, variable):
        for handle in _handles(variable):
            i = self._index.get(id(handle))
            if i is not None:
                return i
        return None

    # ------------------------------------------------------------------
    # Host side
    # ------------------------------------------------------------------

    @property
    def steps_recorded(self):
        """Number of steps recorded so far (reads the device counter)."""
        return int(self._count.numpy())

    def flush(self):
        """Copies the rows written since the last flush to the host.

        Returns:
            A `(num_new_steps, len(self.keys))` float64 NumPy array of the new
            rows, oldest first.
        """
        count = int(self._count.numpy())
        new = count - self._read
        if new <= 0:
            self.last_skipped = np.zeros(0, bool)
            return np.zeros((0, len(self.keys)))
        full = self._buffer.numpy().astype(np.float64)
        buffer = full[:, : len(self.keys)]
        flags = full[:, -1] > 0.5
        lost = max(0, new - self.capacity)
        if lost:
            tf.get_logger().warning(
                f"keras_gradtools: {lost} steps were overwritten before they "
                f"were read (capacity={self.capacity}); they are recorded as "
                "NaN. Flush more often or raise `capacity`."
            )
        kept = new - lost
        rows = (np.arange(count - kept, count)) % self.capacity
        chunk = np.concatenate(
            [np.full((lost, len(self.keys)), np.nan), buffer[rows]], axis=0
        )
        self._read = count
        self._chunks.append(chunk)
        self.last_skipped = np.concatenate([np.zeros(lost, bool), flags[rows]])
        self._skip_chunks.append(self.last_skipped)
        self._cache = None
        return chunk

    @property
    def norms(self):
        """All recorded norms, `(steps, len(self.keys))`, after a flush."""
        self.flush()
        if self._cache is None:
            if self._chunks:
                self._cache = np.concatenate(self._chunks, axis=0)
            else:
                self._cache = np.zeros((0, len(self.keys)))
            self._chunks = [self._cache]
        return self._cache

    @property
    def skipped(self):
        """1-D bool array: the steps the optimizer skipped (loss-scale overflow)."""
        self.flush()
        if len(self._skip_chunks) != 1:
            self._skip_chunks = [np.concatenate(self._skip_chunks or [np.zeros(0, bool)])]
        return self._skip_chunks[0]

    @property
    def history(self):
        """Dict `key -> 1-D array` of norms over all recorded steps."""
        norms = self.norms
        return {key: norms[:, i] for i, key in enumerate(self.keys)}

    @property
    def global_norms(self):
        """1-D array: the norm of all recorded gradients together, per step."""
        return norms_lib.global_norm(self.norms)


def _state_variable(initial, name):
    """A plain variable created outside any trace, written by the train step.

    Never a distributed variable, even inside `strategy.scope()`: it is
    written by one replica per worker only (see `_Recording`), so it is
    constructed as a `ResourceVariable` directly, past the variable creators
    that a strategy scope installs.
    """
    with tf.init_scope():
        return resource_variable_ops.ResourceVariable(initial, trainable=False, name=name)


def _check_lengths(gradients, variables):
    gradients, variables = list(gradients), list(variables)
    if len(gradients) != len(variables):
        raise ValueError(
            "`gradients` and `variables` must have the same length. "
            f"Received: len(gradients)={len(gradients)}, len(variables)={len(variables)}"
        )
    return gradients, variables


def _handles(variable):
    """Objects that may stand for the same variable in a train step."""
    handles = [variable]
    value = getattr(variable, "value", None)
    if isinstance(value, tf.Variable):
        handles.append(value)
    return handles


def instrument_model(model, recorders, applied_recorders=()):
    """Makes `model`'s train function record gradient norms into `recorders`.

    The model's optimizer is wrapped *only while the train function runs*
    (so it is never saved, copied or left wrapped): its `apply` first hands
    the very gradients it received (loss-scaled ones divided by the scale)
    to every recorder, then applies them unchanged. The model's own
    `train_step` is untouched. Call the returned `restore()` to put the
    model's previous train function back; it is also called automatically
    if the train function raises (an error, `KeyboardInterrupt`), and if a
    later `fit()` that does not carry these recorders calls it.

    Instrumenting a model that is already instrumented in the same `fit()`
    adds the recorders to the existing instrumentation: each gradient's
    norm is computed once and written to all of them.

    A `GradNormModel` records in its own `train_step`: then no wrapping is
    done, the recorders are attached to the model instead (on one replica;
    with several, its `train_step` holds one replica's share of the
    gradient, so the recorders get the sum from the optimizer, as for any
    model).

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

    Returns:
        A function `restore()` that detaches these recorders.

    Raises:
        ValueError: if the model has no optimizer.
    """
    recorders = list(recorders)
    applied_recorders = list(applied_recorders)
    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    if isinstance(model, GradNormModel) and strategy.num_replicas_in_sync == 1:
        model._gradtools_recorders.extend(recorders)
        model.make_train_function(force=True)

        def restore_native():
            for recorder in recorders:
                if recorder in model._gradtools_recorders:
                    model._gradtools_recorders.remove(recorder)
            model.train_function = None

        return restore_native

    if model.optimizer is None:
        raise ValueError(
            "The model has no optimizer: call `model.compile(optimizer=...)` "
            f"before `fit()`. Received: model={model.name!r}"
        )
    current = getattr(model.train_function, "_gradtools", None)
    if current is None or not current.attach_ok(model):
        current = _Instrumentation(model)
    current.recorders.extend(recorders)
    current.applied_recorders.extend(applied_recorders)

    def restore():
        current.detach(recorders + applied_recorders)

    return restore


class _Recording:
    """Makes an optimizer feed recorders the gradients it applies, while entered.

    One replica: the optimizer's `apply` is wrapped (the gradients it
    receives, loss scale divided out, before its own clipping). Several
    replicas: the sum leaving the innermost optimizer's all-reduce is
    recorded by this worker's first replica (every replica holds the same
    values), and a loss-scale optimizer's skipped steps are recorded as such.
    """

    def __init__(self, optimizer, strategy=None):
        self.optimizer = optimizer
        self.recorders = []
        self.applied_recorders = []
        self._unhook = None
        self._entered = None
        # The strategy the optimizer was created under (Keras' TF optimizers
        # keep it), else the current one.
        strategy = (strategy
                    or getattr(reducing_optimizer(optimizer), "_distribution_strategy", None)
                    or tf.distribute.get_strategy())
        self.replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
        # Replicas of this worker: one recorder per process, fed by this
        # worker's first replica (every replica sees the same reduced values).
        self.local_replicas = (
            len(strategy.extended.worker_devices) if self.replicas > 1 else 1
        )

    def enter(self):
        optimizer = self.optimizer
        patches = []
        if self.replicas == 1:
            patches.append(_Patch(optimizer, "apply", lambda original: functools.partial(
                self.apply, original)))
        else:
            clipper = _innermost(optimizer)
            if hasattr(clipper, "_reduced_hooks"):
                # A ClippedOptimizer hands over the sum before it clips it.
                clipper._reduced_hooks.append(self.record_reduced)
                self._unhook = lambda: clipper._reduced_hooks.remove(self.record_reduced)
            else:
                patches.append(_Patch(
                    reducing_optimizer(optimizer), "_all_reduce_sum_gradients",
                    lambda original: lambda gv: self.reduced(original, gv),
                ))
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                patches.append(_Patch(
                    optimizer, "_stateful_handle_non_finite_grads",
                    lambda original: lambda: self.skipped(original),
                ))
        hooks = getattr(_innermost(optimizer), "_applied_hooks", None)
        if hooks is not None and self.applied_recorders:
            hooks.append(self._record_applied)
        for patch in patches:
            patch.enter()
        self._entered = (patches, hooks)

    def exit(self):
        if self._entered is None:
            return
        patches, hooks = self._entered
        self._entered = None
        for patch in reversed(patches):
            patch.exit()
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        if hooks is not None and self._record_applied in hooks:
            hooks.remove(self._record_applied)

    def apply(self, apply, grads, trainable_variables=None):
        """The optimizer's `apply` (one replica): `apply`, then record what it got."""
        optimizer = self.optimizer
        grads = list(grads)
        if trainable_variables is None:
            variables = list(optimizer._trainable_variables)
        else:
            trainable_variables = list(trainable_variables)
            variables = trainable_variables
        scale = loss_scale_of(optimizer)
        # The norms are taken first and each variable's update is ordered
        # after its gradient's norm (see `_ordered_after`); they are written
        # once the step's verdict is known.
        shared = {}
        pending = [(recorder, recorder.step_norms(grads, variables, scale, shared))
                   for recorder in self.recorders]
        grads = _ordered_after(shared, grads)
        skipped = None
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # The loss-scale optimizer's own verdict on this step (its
            # `check_finite`, captured as it runs): a step it skips is
            # recorded as skipped, not judged as an exploding gradient.
            verdicts = []
            patch = _Patch(optimizer, "check_finite", lambda original: lambda g: (
                verdicts.append(original(g)) or verdicts[-1]))
            patch.enter()
            try:
                result = apply(grads, trainable_variables)
            finally:
                patch.exit()
            if verdicts:
                skipped = tf.logical_not(verdicts[0])
        else:
            result = apply(grads, trainable_variables)
        for recorder, norms in pending:
            recorder.write(norms, skipped)
        if self.applied_recorders and self.keras_clipping:
            inner = _innermost(optimizer)
            unscaled = grads if scale is None else [
                None if g is None else g / tf.cast(scale, g.dtype) for g in grads
            ]
            present = [(g, v) for g, v in zip(unscaled, variables) if g is not None]
            clipped = inner._clip_gradients([g for g, _ in present])
            self._record_applied(clipped, [v for _, v in present])
        return result

    def _record_applied(self, grads, variables):
        if not self._recording_replica():
            return
        shared = {}
        for recorder in self.applied_recorders:
            recorder.record_step(grads, variables, None, shared)

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

    def reduced(self, original, grads_and_vars):
        """Records the all-reduced gradients (several replicas), then returns them."""
        grads_and_vars = original(grads_and_vars)
        self.record_reduced(grads_and_vars)
        return grads_and_vars

    def record_reduced(self, grads_and_vars):
        if self._recording_replica():
            grads = [g for g, _ in grads_and_vars]
            variables = [v for _, v in grads_and_vars]
            shared = {}
            # Keras' own clipnorm/clipvalue/global_clipnorm act on each
            # replica's share before this sum: what is recorded here is then
            # the applied gradient, for both recordings.
            for recorder in self.recorders + (
                self.applied_recorders if self.keras_clipping else []
            ):
                recorder.record_step(grads, variables, None, shared)

    def skipped(self, original):
        """The loss-scale optimizer skips a step: record it as such (several replicas)."""
        result = original()
        if self._recording_replica():
            for recorder in self.recorders + self.applied_recorders:
                recorder.write_skipped()
        return result

    @property
    def keras_clipping(self):
        """Whether the optimizer clips with Keras' own arguments."""
        return bool(keras_clip_arguments(self.optimizer))


class _Instrumentation(_Recording):
    """A train function that records while it runs; see `instrument_model`."""

    def __init__(self, model):
        super().__init__(
            model.optimizer,
            getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy(),
        )
        self.model = model
        self.active = True
        self.previous = model.train_function
        self.history = getattr(model, "history", None)
        model.make_train_function(force=True)
        self.compiled = model.train_function

        def train_function(iterator):
            return self.call(iterator)

        train_function._gradtools = self
        self.train_function = train_function
        model.train_function = train_function

    def attach_ok(self, model):
        return (
            self.active
            and model.optimizer is self.optimizer
            and getattr(model, "history", None) is self.history
        )

    def detach(self, recorders):
        for recorder in recorders:
            for group in (self.recorders, self.applied_recorders):
                if recorder in group:
                    group.remove(recorder)
        if not self.recorders and not self.applied_recorders:
            self.restore()

    def restore(self):
        if not self.active:
            return
        self.active = False
        self.recorders = []
        if self.model.train_function is self.train_function:
            self.model.train_function = self.previous

    def call(self, iterator):
        model = self.model
        if not self.active or getattr(model, "history", None) is not self.history:
            # A later fit() that does not carry these recorders.
            self.restore()
            model.make_train_function()
            return model.train_function(iterator)
        self.enter()
        try:
            return self.compiled(iterator)
        except BaseException:
            self.restore()
            raise
        finally:
            self.exit()


_MISSING = object()


class _Patch:
    """Replaces an attribute of one object for a while, then puts it back.

    `make(original)` returns the replacement; `original` is what the
    attribute resolves to now (an instance attribute or the bound method).
    Patches nest: a later patch wraps an earlier one.
    """

    def __init__(self, target, name, make):
        self.target, self.name, self.make = target, name, make

    def enter(self):
        self.own = self.target.__dict__.get(self.name, _MISSING)
        setattr(self.target, self.name, self.make(getattr(self.target, self.name)))

    def exit(self):
        if self.own is _MISSING:
            self.target.__dict__.pop(self.name, None)
        else:
            setattr(self.target, self.name, self.own)


class recording:
    """Context manager: `optimizer` feeds `recorders` the gradients it applies.

    For custom training loops, including ones under `tf.distribute`
    (`strategy.run`): enter it around the calls of your `tf.function` train
    step (it must be active while the step is traced: the recording is
    built into the traced graph, and stays in it), and call
    `optimizer.apply(grads, variables)` in the step as usual. With several
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
        if isinstance(recorders, GradNormRecorder):
            recorders = [recorders]
        self._recording = _Recording(optimizer, strategy)
        self._recording.recorders.extend(recorders)
        self._recording.applied_recorders.extend(applied_recorders)

    def __enter__(self):
        self._recording.enter()
        return self

    def __exit__(self, *exc):
        self._recording.exit()
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


def reducing_optimizer(optimizer):
    """The optimizer that all-reduces the gradients: the innermost of any wrappers."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def keras_clip_arguments(optimizer):
    """Which of Keras' own `clipnorm`/`clipvalue`/`global_clipnorm` an optimizer sets.

    Looks inside a loss-scale optimizer; a `ClippedOptimizer` (which clips
    with its own methods) gives `[]`.
    """
    inner = _innermost(optimizer) if optimizer is not None else None
    if inner is None or hasattr(inner, "clip_gradients"):
        return []
    return [a for a in ("clipnorm", "clipvalue", "global_clipnorm")
            if getattr(inner, a, None) is not None]


def _innermost(optimizer):
    """The optimizer inside a `LossScaleOptimizer`, or the optimizer itself."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _histogram(gradient, variable, scale, buckets):
    """`(buckets, 3)` rows `[left, right, count]` over a gradient's finite values."""
    if gradient is None:
        values = tf.zeros([tf.size(variable)], tf.float32)
    else:
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        values = tf.reshape(tf.cast(gradient, tf.float32), [-1])
    if scale is not None:
        values = values / tf.cast(scale, tf.float32)
    finite = tf.math.is_finite(values)
    lo = tf.reduce_min(tf.where(finite, values, np.inf))
    hi = tf.reduce_max(tf.where(finite, values, -np.inf))
    lo = tf.where(tf.math.is_finite(lo), lo, 0.0)
    hi = tf.where(tf.math.is_finite(hi), hi, 0.0)
    width = hi - lo
    position = tf.where(width > 0, (values - lo) / tf.maximum(width, 1e-30) * buckets, 0.0)
    position = tf.where(finite, position, 0.0)
    ids = tf.clip_by_value(tf.cast(tf.floor(position), tf.int32), 0, buckets - 1)
    counts = tf.math.unsorted_segment_sum(tf.cast(finite, tf.float32), ids, buckets)
    edges = lo + width * tf.range(buckets + 1, dtype=tf.float32) / buckets
    return tf.stack([edges[:-1], edges[1:], counts], axis=1)


def _ordered_after(shared, gradients):
    """The gradients, each to be applied only once its own norm is computed.

    `shared` maps `id(gradient)` to the norm op `_norms_for` made for it.
    Ordering each variable's update after its gradient's norm, rather than
    leaving them side by side, is what keeps the recording cheap on a CPU
    (measured below). Our reading of why, not verified in a profile: the
    norm reads the gradient while it is still in cache, before the update
    has touched it, and the update's element-wise ops may then reuse the
    gradient's buffer in place (a reader still pending would forbid that).
    Ordering per variable (not all updates after all norms) keeps the
    updates of the last layers free to run while the first layers'
    gradients are still being computed.
    Measured with `scripts/bench_overhead.py`'s method (each run between
    two plain runs, 9 repetitions): deep linear MLP 1.046 unordered, 1.008
    ordered per variable, 1.006 all after all; small CNN 1.006, 1.013 and
    1.037. Gradients without a norm (biases by default) pass unchanged; the
    others are the same tensors, passed through `tf.identity`.
    """
    ordered = []
    for gradient in gradients:
        norm = None if gradient is None else shared.get(id(gradient))
        if norm is None:
            ordered.append(gradient)
            continue
        with tf.control_dependencies([norm]):
            ordered.append(tf.identity(gradient))
    return ordered


def _norms_for(recorder, grads, variables, scale, shared):
    """Norms for one recorder, computing each gradient's norm only once."""
    slots = [None] * len(recorder.variables)
    for gradient, variable in zip(grads, variables):
        i = recorder._lookup(variable)
        if i is None or slots[i] is not None:
            continue
        slots[i] = (id(gradient), gradient)
    values = []
    for slot in slots:
        if slot is None or slot[1] is None:
            values.append(tf.constant(0.0, tf.float32))
            continue
        key, gradient = slot
        if key not in shared:
            shared[key] = norms_lib.half_squared_norm(gradient)
        values.append(shared[key])
    if not values:
        return tf.zeros([0], tf.float32)
    # One stack, one sqrt for all variables: fewer ops in the step.
    norms = tf.sqrt(2.0 * tf.stack(values))
    if scale is not None:
        norms = norms / tf.cast(scale, tf.float32)
    return norms


@keras.saving.register_keras_serializable(package="keras_gradtools")
class GradNormModel(keras.Model):
    """A `keras.Model` whose GradientTape train step records gradient norms.

    Use it as the base class of a subclassed model (or wrap inputs and
    outputs as with `keras.Model(inputs, outputs)`) when you want the
    recording in plain sight rather than through `GradNormLogger`'s
    instrumentation. The train step follows Keras' own, in three phases
    (forward, gradients, update); between the last two it hands the
    gradients to `record_gradient_norms()`, which feeds every attached
    recorder. A subclass that writes its own `train_step` calls
    `self.record_gradient_norms(gradients, variables)` the same way.

    `fit()` attaches a `GradNormLogger` when none is given, so that the
    norms are always read; it is kept as `model.grad_norm_logger`.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((3,))
    >>> outputs = keras.layers.Dense(1, name="out")(inputs)
    >>> model = GradNormModel(inputs, outputs)
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> _ = model.fit(np.ones((8, 3)), np.zeros((8, 1)), batch_size=4,
    ...               epochs=1, verbose=0)
    >>> model.grad_norm_logger.history["out/kernel"].shape
    (2,)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A plain list is tracked by Keras; keep the recorders out of sight
        # of tracking and saving.
        object.__setattr__(self, "_gradtools_recorders", [])
        object.__setattr__(self, "grad_norm_logger", None)

    def record_gradient_norms(self, gradients, variables, scale=None):
        """Feeds the gradients to every recorder attached to this model.

        Call it inside `train_step`, after the gradients are computed and
        before they are applied, and apply what it returns: the same
        gradients, each ordered after its norm so that its update does not
        compete with it (the cheap order; applying the original list is
        correct too, only slower on a CPU).

        Args:
            gradients: the gradients, one per variable.
            variables: the variables, in the same order.
            scale: the loss scale to divide out, or `None` to use the
                optimizer's (see `loss_scale_of`). Defaults to `None`.

        Returns:
            The gradients to apply, a list in the same order.
        """
        if not self._gradtools_recorders:
            return list(gradients)
        if scale is None:
            scale = loss_scale_of(self.optimizer)
        gradients = list(gradients)
        variables = list(variables)
        shared = {}
        for recorder in self._gradtools_recorders:
            recorder.record_step(gradients, variables, scale, shared)
        return _ordered_after(shared, gradients)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        # Forward pass
        with tf.GradientTape() as tape:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
            self._loss_tracker.update_state(
                _unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(
                    next(i for i in tf.nest.flatten(x) if i is not None)
                )[0],
            )
            scaled_loss = self.optimizer.scale_loss(loss)

        # Compute gradients
        trainable_variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, trainable_variables)
        gradients = self.record_gradient_norms(gradients, trainable_variables)

        # Update weights
        self.optimizer.apply(gradients, trainable_variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def fit(self, *args, callbacks=None, **kwargs):
        from keras_gradtools.callbacks import GradNormLogger

        # Recorders of an earlier fit() that ended in an exception.
        del self._gradtools_recorders[:]
        callbacks = list(callbacks or [])
        if not any(isinstance(c, GradNormLogger) for c in callbacks):
            if self.grad_norm_logger is None:
                object.__setattr__(self, "grad_norm_logger", GradNormLogger())
            callbacks.append(self.grad_norm_logger)
        return super().fit(*args, callbacks=callbacks, **kwargs)
