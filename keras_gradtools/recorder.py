"""The ring buffer: per-step gradient norms written inside the train step, read on the host.

A `GradNormRecorder` keeps a ring buffer of per-step norms in device
variables (TF variables on TensorFlow, Keras variables written with
`keras.ops` on JAX and PyTorch) that the compiled train step writes (`record`, or `step_norms` then
`write`); the host copies the new rows into a growing host-side store
(`flush`) on its own schedule, so recording costs no host round trip per
step. Reading (`norms`, `history`, `global_norms`, `skipped`,
`histograms`) copies whatever the device holds that the host has not seen
yet and returns the whole store: every row ever recorded stays readable,
and no read hides a row from any other reader.

Who feeds a recorder lives in `keras_gradtools.tap` (the optimizer's
`apply` while `fit()` runs, or a custom loop's optimizer under
`recording`), in `keras_gradtools.model` (`GradNormModel`'s own train
step), or a custom loop calls `record` itself.
"""

import warnings

import keras
import numpy as np
from keras_gradtools._tensorflow import tf
from keras import ops

from keras_gradtools import internals
from keras_gradtools import norms as norms_lib

_DEFAULT_CAPACITY = 4096


class GradNormRecorder:
    """Records the L2 norm of each variable's gradient at every step.

    The norms live in a `(capacity, num_variables)` float32 ring buffer
    written inside the compiled train step; `flush()` copies the rows
    written since the last copy to the host. Copy at least every
    `capacity` steps: rows older than that are overwritten, and `flush()`
    then warns and records the lost steps as NaN so that step numbers stay
    right. The read properties copy too, so reading never loses a step.

    The recorder is not tracked by any model: it is never saved with one.
    On TensorFlow the buffer is a TF variable written in the compiled step
    (also under `tf.distribute`); on JAX it is a pair of Keras variables,
    the buffer and a step counter, written with `keras.ops`
    (`device_variables`: they must be part of the optimizer's state while
    training, which `GradNormLogger` arranges); on PyTorch, whose train step
    runs eagerly, a Keras variable written in place, the step count kept on
    the host.

    Args:
        variables: the variables whose gradients may be recorded, e.g.
            `model.trainable_variables`; on TensorFlow also `None`, for
            variables fixed at the first step by `bind` (a model built in
            its traced train step).
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
        self.histogram_freq = int(histogram_freq or 0)
        self.histogram_buckets = int(histogram_buckets)
        self._tf = keras.backend.backend() == "tensorflow"
        self._torch = keras.backend.backend() == "torch"
        self.bound = variables is not None
        if not self.bound and not self._tf:
            raise ValueError(
                "`variables=None` (bound at the first step) is for TensorFlow, where a model "
                "that is not built before fit() creates its variables in the traced step. "
                f"Received: variables=None on {keras.backend.backend()!r}"
            )
        self._set_variables(variables or [])
        width = max(len(self.variables), 1)
        if not self._tf:
            # One column per variable, then the step's "skipped" flag.
            self._buffer = keras.Variable(np.zeros((capacity, width + 1), "float32"),
                                          trainable=False, name="gradtools_norms")
            # PyTorch keeps the step count on the host (see `_torch_write`).
            self._count = None if self._torch else keras.Variable(
                0, dtype="int32", trainable=False, name="gradtools_count")
            if self.histogram_freq:
                slots = capacity // self.histogram_freq + 2
                self._hist = keras.Variable(
                    np.zeros((slots, width, self.histogram_buckets, 3), "float32"),
                    trainable=False, name="gradtools_histograms")
                self._hist_steps = keras.Variable(np.full((slots,), -1, "int32"),
                                                  trainable=False,
                                                  name="gradtools_histogram_steps")
            self.reset()
            return
        self._count = internals.local_variable(tf.constant(0, tf.int64), "gradtools_count")
        self._tf_buffers(width)
        if self.histogram_freq:
            self._hist_steps = internals.local_variable(
                tf.fill([capacity // self.histogram_freq + 2], tf.constant(-1, tf.int64)),
                "gradtools_histogram_steps"
            )
        self.reset()

    def _set_variables(self, variables):
        self.variables = norms_lib.select_variables(variables, self.include_biases)
        self.keys = norms_lib.unique_keys(self.variables)
        self._index = {}
        for i, variable in enumerate(self.variables):
            for handle in internals.variable_handles(variable):
                self._index[id(handle)] = i

    def _tf_buffers(self, width):
        """TensorFlow: the norm (and histogram) buffers for `width` variables."""
        # NumPy initial values: this may run inside a trace (`bind`).
        self._buffer = internals.local_variable(
            np.zeros([self.capacity, width + 1], "float32"), "gradtools_norms")
        if self.histogram_freq:
            self._hist = internals.local_variable(
                np.zeros([self.capacity // self.histogram_freq + 2, width,
                          self.histogram_buckets, 3], "float32"),
                "gradtools_histograms",
            )

    def bind(self, variables):
        """Fixes the recorded variables of a recorder made with `variables=None`.

        TensorFlow only: a model that is not built when `fit()` starts
        (a subclassed model never called, a `Sequential` without an `Input`)
        creates its variables while its train step is traced; the tap
        binds its recorders there, before the first step's norms. No-op on
        a bound recorder.

        Args:
            variables: the variables whose gradients may be recorded.

        Returns:
            `None`.
        """
        if self.bound:
            return
        self.bound = True
        self._set_variables(variables)
        # Created outside the trace (`internals.local_variable`); no step
        # has been written yet, so nothing recorded is lost.
        self._tf_buffers(max(len(self.variables), 1))
        self._store = _RowStore(len(self.keys))

    def reset(self):
        """Forgets everything recorded; the step counter restarts at 0.

        Returns:
            `None`.
        """
        if self._torch:
            self._torch_count = 0
        else:
            self._count.assign(0)
        if self.histogram_freq:
            self._hist_steps.assign(np.full(self._hist_steps.shape, -1,
                                            "int64" if self._tf else "int32"))
        self._store = _RowStore(len(self.keys))
        self._hist_store = []
        self._hist_next = 0

    def read_values(self, variables):
        """The current values of device variables, as the host reads them.

        On JAX, `GradNormLogger` replaces this on the instance while the
        trainer holds the variables in its state (and deletes it after).
        """
        return [v.value for v in variables]

    @property
    def device_variables(self):
        """The variables the train step writes (JAX: to carry in the optimizer's state)."""
        counted = [self._buffer] + ([] if self._count is None else [self._count])
        if self.histogram_freq:
            return counted + [self._hist, self._hist_steps]
        return counted

    # ------------------------------------------------------------------
    # Device side: called inside the train step
    # ------------------------------------------------------------------

    def record(self, gradients, variables, scale=None, skipped=None):
        """Writes one step's norms into the buffer (call in the train step).

        Gradients are matched to the recorder's variables by identity; a
        recorded variable that is absent from `variables`, or whose gradient
        is `None`, gets 0.

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
        gradients, variables = list(gradients), list(variables)
        if len(gradients) != len(variables):
            raise ValueError(
                "`gradients` and `variables` must have the same length. "
                f"Received: len(gradients)={len(gradients)}, len(variables)={len(variables)}"
            )
        norms = self.step_norms(gradients, variables, scale)
        self.write(norms, skipped)
        return norms

    def step_norms(self, gradients, variables, scale=None, shared=None):
        """One step's norms (and histograms on their steps), not yet written.

        The first half of `record`: `write` the result once the step's
        `skipped` verdict is known.

        Args:
            gradients: the gradients, one per variable.
            variables: the variables, in the same order.
            scale: the loss scale to divide out, or `None`. Defaults to
                `None`.
            shared: a dict `id(gradient) -> half squared norm` that lets
                several recorders of one step compute each norm once.
                Defaults to `None`.

        Returns:
            A float32 tensor of shape `(len(self.keys),)`.
        """
        shared = {} if shared is None else shared
        slots = self._slots(gradients, variables)
        if not self._tf:
            norms = self._ops_norms(slots, scale, shared)
            if self.histogram_freq:
                self._ops_write_histograms(slots, scale)
            return norms
        values = []
        for gradient in slots:
            if gradient is None:
                values.append(tf.constant(0.0, tf.float32))
                continue
            if id(gradient) not in shared:
                shared[id(gradient)] = norms_lib.half_squared_norm(gradient)
            values.append(shared[id(gradient)])
        if values:
            # One stack, one sqrt for all variables: fewer ops in the step.
            norms = tf.sqrt(2.0 * tf.stack(values))
            if scale is not None:
                norms = norms / tf.cast(scale, tf.float32)
        else:
            norms = tf.zeros([0], tf.float32)
        if self.histogram_freq:
            self._write_histograms(slots, scale)
        return norms

    def _ops_norms(self, slots, scale, shared):
        """`step_norms` with `keras.ops` (JAX, PyTorch): sums of squares in float32."""
        if self._torch:
            return self._torch_norms(slots, scale, shared)
        values = []
        for gradient in slots:
            if gradient is None:
                values.append(ops.zeros((), "float32"))
                continue
            if id(gradient) not in shared:
                shared[id(gradient)] = norms_lib.squared_norm(gradient)
            values.append(shared[id(gradient)])
        if not values:
            return ops.zeros((0,), "float32")
        norms = ops.sqrt(ops.stack(values))
        if scale is not None:
            norms = norms / ops.cast(scale, "float32")
        return norms

    def _ops_write_histograms(self, slots, scale):
        """`_write_histograms` with `keras.ops`: computed on the histogram steps only."""
        step = (ops.convert_to_tensor(self._torch_count, "int32") if self._torch
                else self._count.value)
        hist, hist_steps = self._hist.value, self._hist_steps.value

        def write():
            rows = ops.stack([_histogram(gradient, variable, scale, self.histogram_buckets)
                              for gradient, variable in zip(slots, self.variables)]
                             or [ops.zeros((self.histogram_buckets, 3))])
            slot = ops.reshape(ops.mod(step // self.histogram_freq, hist_steps.shape[0]),
                               (1, 1))
            return (ops.scatter_update(hist, slot, ops.expand_dims(rows, 0)),
                    ops.scatter_update(hist_steps, slot, ops.reshape(step, (1,))))

        due = ops.equal(ops.mod(step, self.histogram_freq), 0)
        hist, hist_steps = ops.cond(due, write, lambda: (hist, hist_steps))
        self._hist.assign(hist)
        self._hist_steps.assign(hist_steps)

    def _torch_norms(self, slots, scale, shared):
        """PyTorch: every gradient's float32 norm in one call (`internals.torch_norms`).

        PyTorch runs eagerly, where each `keras.ops` call costs its own
        dispatch (about 8x the time of the torch kernel for a 256x256
        gradient on a CPU): the norms use torch directly, all at once (one
        multi-tensor kernel on a GPU instead of a launch per variable).
        """
        import torch

        device = self._buffer.value.device
        todo = {}
        for gradient in slots:
            if gradient is not None and ("torch", id(gradient)) not in shared:
                todo[id(gradient)] = gradient
        with torch.no_grad():
            for key, norm in zip(todo, internals.torch_norms(list(todo.values()))):
                shared[("torch", key)] = norm
            values = [torch.zeros((), dtype=torch.float32, device=device) if gradient is None
                      else shared[("torch", id(gradient))] for gradient in slots]
            if not values:
                return torch.zeros((0,), dtype=torch.float32, device=device)
            norms = torch.stack(values)
            if scale is not None:
                norms = norms / ops.convert_to_tensor(scale).to(torch.float32)
        return norms

    def _torch_write(self, norms, skipped):
        """PyTorch: the row written in place, at the host's step count.

        PyTorch's train step runs eagerly, each write called from the host
        in step order: the count is a Python int (`_torch_count`), and a
        row is two in-place copies into views of the buffer (no sync, no
        index arithmetic on the device, one kernel each on a GPU).
        """
        import torch

        row = self._buffer.value[self._torch_count % self.capacity]
        with torch.no_grad():
            if self.variables:
                row[:-1].copy_(torch.as_tensor(norms))
            else:
                row[:-1].zero_()
            if skipped is None:
                row[-1].zero_()
            else:
                row[-1].copy_(ops.convert_to_tensor(skipped))
        self._torch_count += 1

    def write(self, norms, skipped=None):
        """Writes an already computed norm vector as the next step's row.

        Args:
            norms: a float32 tensor of shape `(len(self.keys),)`.
            skipped: see `record`. Defaults to `None`.

        Returns:
            `None`.
        """
        if self._torch:
            return self._torch_write(norms, skipped)
        if not self._tf:
            if not self.variables:
                norms = ops.zeros((1,), "float32")
            flag = (ops.zeros((1,), "float32") if skipped is None
                    else ops.reshape(ops.cast(skipped, "float32"), (1,)))
            row = ops.mod(self._count.value, self.capacity)
            values = ops.concatenate([ops.reshape(ops.cast(norms, "float32"), (-1,)), flag])
            self._buffer.assign(ops.scatter_update(
                self._buffer.value, ops.reshape(ops.cast(row, "int32"), (1, 1)),
                ops.expand_dims(values, 0)))
            self._count.assign(self._count.value + 1)
            return
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
        self.write(ops.full((max(len(self.keys), 1),), np.nan, "float32"),
                   ops.convert_to_tensor(True))

    def _slots(self, gradients, variables):
        """Each recorded variable's gradient (or `None`), in the recorder's order."""
        slots = [None] * len(self.variables)
        filled = [False] * len(self.variables)
        for gradient, variable in zip(gradients, variables):
            for handle in internals.variable_handles(variable):
                i = self._index.get(id(handle))
                if i is not None:
                    break
            if i is None or filled[i]:
                continue
            slots[i], filled[i] = gradient, True
        return slots

    def _write_histograms(self, slots, scale):
        step = self._count.read_value()

        def write():
            rows = [_histogram(gradient, variable, scale, self.histogram_buckets)
                    for gradient, variable in zip(slots, self.variables)]
            slot = tf.math.floormod(step // self.histogram_freq, self._hist_steps.shape[0])
            index = tf.reshape(slot, [1, 1])
            self._hist.scatter_nd_update(index, tf.expand_dims(tf.stack(rows), 0))
            self._hist_steps.scatter_nd_update(index, tf.reshape(step, [1]))
            return tf.constant(True)

        tf.cond(tf.equal(tf.math.floormod(step, self.histogram_freq), 0),
                write, lambda: tf.constant(False))

    # ------------------------------------------------------------------
    # Host side
    # ------------------------------------------------------------------

    def _device_values(self, variable):
        if self._tf:
            return variable.numpy()
        return norms_lib.to_numpy(self.read_values([variable])[0])

    def _device_count(self):
        if self._torch:
            return self._torch_count
        return int(self._device_values(self._count))

    def _device_buffer(self):
        return self._device_values(self._buffer)

    @property
    def steps_recorded(self):
        """Number of steps recorded so far (reads the device counter)."""
        return self._device_count()

    def flush(self):
        """Copies the rows written since the last copy to the host store.

        Every row stays in the store (`norms`): this only moves data from
        the device to the host. Rows overwritten before they were copied
        (more than `capacity` steps since the last copy) are stored as NaN,
        with a warning, so that step numbers stay right.

        Returns:
            A `(num_new_steps, len(self.keys))` float64 NumPy array of the
            new rows, oldest first.
        """
        count = self._device_count()
        new = count - self._store.size
        if new <= 0:
            return np.zeros((0, len(self.keys)))
        full = self._device_buffer().astype(np.float64)
        lost = max(0, new - self.capacity)
        if lost:
            warnings.warn(
                f"keras_gradtools: {lost} steps were overwritten before they "
                f"were read (capacity={self.capacity}); they are recorded as "
                "NaN. Flush more often or raise `capacity`.", stacklevel=2
            )
        rows = np.arange(count - (new - lost), count) % self.capacity
        chunk = np.concatenate(
            [np.full((lost, len(self.keys)), np.nan), full[rows, : len(self.keys)]], axis=0)
        skipped = np.concatenate([np.zeros(lost, bool), full[rows, -1] > 0.5])
        self._store.append(chunk, skipped)
        return chunk

    @property
    def norms(self):
        """All recorded norms, `(steps, len(self.keys))` float64 (read-only)."""
        self.flush()
        return self._store.rows

    @property
    def skipped(self):
        """1-D bool array: the steps the optimizer skipped (loss-scale overflow)."""
        self.flush()
        return self._store.skipped

    @property
    def history(self):
        """Dict `key -> 1-D array` of norms over all recorded steps."""
        norms = self.norms
        return {key: norms[:, i] for i, key in enumerate(self.keys)}

    @property
    def global_norms(self):
        """1-D array: the norm of all recorded gradients together, per step."""
        return norms_lib.global_norm(self.norms)

    def histograms(self, since=0):
        """Histograms recorded at steps `>= since`: `[(step, {key: (B, 3) array})]`.

        Each array holds TensorBoard's `[left, right, count]` rows over the
        gradient's finite values (unscaled). Histograms are copied from the
        device as they are read and kept, so any step can be read again.

        Args:
            since: the first step of interest. Defaults to `0`.

        Returns:
            A list of `(step, dict)`, in step order.
        """
        if not self.histogram_freq:
            return []
        steps = self._device_values(self._hist_steps)
        data = None
        for slot in np.argsort(steps):
            step = int(steps[slot])
            if step < self._hist_next:
                continue
            data = self._device_values(self._hist) if data is None else data
            self._hist_store.append(
                (step, {k: data[slot, i].copy() for i, k in enumerate(self.keys)}))
            self._hist_next = step + 1
        return [(step, h) for step, h in self._hist_store if step >= since]


class _RowStore:
    """A growing host-side array of rows (amortized doubling) and their skip flags."""

    def __init__(self, width):
        self._rows = np.zeros((0, width))
        self._skipped = np.zeros(0, bool)
        self.size = 0

    def append(self, rows, skipped):
        end = self.size + len(rows)
        if end > len(self._rows):
            grown = max(end, 2 * len(self._rows), 64)
            self._rows = _grow(self._rows, grown)
            self._skipped = _grow(self._skipped, grown)
        self._rows[self.size:end] = rows
        self._skipped[self.size:end] = skipped
        self.size = end

    @property
    def rows(self):
        return _read_only(self._rows[: self.size])

    @property
    def skipped(self):
        return _read_only(self._skipped[: self.size])


def _grow(array, length):
    out = np.zeros((length,) + array.shape[1:], array.dtype)
    out[: len(array)] = array
    return out


def _read_only(view):
    view = view.view()
    view.flags.writeable = False
    return view


def _histogram(gradient, variable, scale, buckets):
    """`(buckets, 3)` rows `[left, right, count]` over a gradient's finite values (any backend)."""
    if gradient is None:
        values = ops.zeros((int(np.prod(variable.shape)),), "float32")
    else:
        if keras.backend.backend() == "tensorflow" and isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        values = ops.reshape(ops.cast(gradient, "float32"), (-1,))
    if scale is not None:
        values = values / ops.cast(scale, "float32")
    finite = ops.isfinite(values)
    lo = ops.min(ops.where(finite, values, np.inf))
    hi = ops.max(ops.where(finite, values, -np.inf))
    lo = ops.where(ops.isfinite(lo), lo, 0.0)
    hi = ops.where(ops.isfinite(hi), hi, 0.0)
    width = hi - lo
    position = ops.where(width > 0, (values - lo) / ops.maximum(width, 1e-30) * buckets, 0.0)
    position = ops.where(finite, position, 0.0)
    ids = ops.clip(ops.cast(ops.floor(position), "int32"), 0, buckets - 1)
    counts = ops.segment_sum(ops.cast(finite, "float32"), ids, num_segments=buckets)
    edges = lo + width * ops.arange(buckets + 1, dtype="float32") / buckets
    return ops.stack([edges[:-1], edges[1:], counts], axis=1)
