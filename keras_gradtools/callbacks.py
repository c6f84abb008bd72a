"""Keras callbacks: `GradNormLogger` records every layer's gradient norm."""

import csv
import io
import json
import os
import time
import warnings

import numpy as np
import keras
from keras_gradtools._tensorflow import tf

from keras_gradtools import clipping
from keras_gradtools import diagnose
from keras_gradtools import internals
from keras_gradtools import norms as norms_lib
from keras_gradtools import runs
from keras_gradtools import tap
from keras_gradtools.activations import ActivationProbe, ActivationRecord
from keras_gradtools.facts import model_facts
from keras_gradtools.recorder import GradNormRecorder


class GradNormLogger(keras.callbacks.Callback):
    """Records the L2 norm of every layer's weight gradient at every step.

    Works on any compiled Keras 3 model trained with the stock `fit()`
    (Sequential, Functional, subclassed; RNNs, embeddings, batch norm, frozen
    layers). The norms are taken inside the compiled train step from the
    very gradients the optimizer applies: no second forward or backward
    pass, no host round trip per step. For the duration of `fit()` the
    model's train function is rebuilt with the optimizer's `apply` wrapped
    (see `instrument_model`); when `fit()` returns, raises or is interrupted
    the previous train function is put back, so the model is exactly as
    found and `model.save()` is unaffected.

    What is recorded:

    - `history[key]`: 1-D float64 array, one norm per training step of the
      last `fit()`, in order. Keys are Keras 3 `variable.path`
      (`"sequential/dense_3/kernel"`), ordered as `model.trainable_variables`.
    - `global_norms`: the norm of all recorded gradients together, per step.
    - `epoch_end_steps`: the number of steps done at the end of each epoch.
    - In Keras' `History` (`model.fit(...).history`), each epoch's mean per
      variable as `grad_norm/<key>` and the epoch's largest global norm as
      `grad_norm_max/global` (the latter is also put in the epoch `logs`, so
      the progress bar, `CSVLogger` and `EarlyStopping` see it; the
      per-variable means go straight into `History` to keep the progress bar
      readable).
    - `activations` (with `probe_data`): an `ActivationRecord`, the
      statistics of each hidden layer's activations on the probe batch at
      every probe step; `update_ratios` (with `update_ratio=True`): dict
      `key -> 1-D array` of each step's update-to-weight ratio.

    Details a user relies on:

    - Under a loss-scaling optimizer (`mixed_float16`) the norms are those
      of the unscaled gradients. A step that the loss-scale optimizer skips
      (its scaled gradients overflowed) is recorded with its non-finite
      norms (NaN where the gradients never reach the tap: several TF
      replicas, JAX) and listed in `skipped_steps`; `GradientMonitor` does not judge
      it (a long run of skips is reported: see `diagnose.nonfinite_rule`).
    - The norms are pre-clipping: they are the gradients the optimizer
      receives, before its own `clipnorm`/`clipvalue`/`global_clipnorm`.
    - With the optimizer's `gradient_accumulation_steps=N`, each step's row
      is that batch's own gradient (what the optimizer receives); the
      optimizer applies the mean of N such gradients every N steps.
    - A model that is not built when `fit()` starts (a subclassed model
      never called, a `Sequential` without an `Input`) is recorded from its
      first step like any other; its keys are known once that step ran.
    - Frozen variables are not trainable and are not recorded. A trainable
      variable that gets no gradient (not connected to the loss) is recorded
      as 0, which is what the optimizer applies to it.
    - Biases (variables named `bias`) are left out unless
      `include_biases=True`; see `keras_gradtools.norms.is_bias`.
    - Reusing one logger for several `fit()` calls starts a new recording
      each time (like Keras' own callbacks, state is reset in
      `on_train_begin`). Two loggers in one `fit()` each keep their own
      recording (with their own settings); each gradient's norm is computed
      once and shared between them.
    - A NaN in the data shows up as a NaN norm at that step; nothing here
      raises because of it.
    - Under `tf.distribute.MirroredStrategy` (and MultiWorkerMirroredStrategy)
      the norms are those of the all-reduced gradient the optimizer applies,
      taken as it leaves the optimizer's own all-reduce (no second
      all-reduce), and written once per worker; only the chief worker writes
      TensorBoard events (`is_chief`). Keras' own `clipnorm`/`clipvalue`/
      `global_clipnorm` clip each replica's share before the sum there: the
      logger warns and records the summed, applied gradient (use
      `clipped_optimizer` inside the strategy scope to clip the sum). Other
      strategies with several replicas are refused with a `ValueError`.
    - Backends: TensorFlow, JAX and PyTorch, the same numbers on each. On
      JAX under `keras.distribution.DataParallel` the norms are those of
      the global gradient (what the optimizer applies); other
      `keras.distribution`s are refused.

    TensorBoard (`log_dir`): scalars `grad_norm/<key>` and
    `grad_norm/global` every `update_freq` steps, written from the host
    recording (nothing extra in the train step); with a clipping optimizer
    also `grad_norm_applied/global`; histograms `grad_hist/<key>` of each
    recorded gradient's values every `histogram_freq` steps, computed in the
    compiled step only on those steps; with `probe_data`, scalars
    `activation/<layer>/<mean|std|saturated|dead|gain>` and histograms
    `activation_hist/<layer>` at every probe; and the `GradientMonitor`'s
    findings as text (`gradtools/findings`). See `keras_gradtools.summaries` for the
    layout that lines up with Keras' own `TensorBoard` callback. Events are
    flushed at every host read, so a run interrupted by an exception,
    `KeyboardInterrupt` or `stop_training` leaves readable files.

    Args:
        include_biases: whether biases are recorded too. Defaults to `False`.
        flush_every: the recording is copied from the device every this
            many steps (and at every epoch end). Larger is cheaper; readers
            such as `GradientMonitor` see new steps at this pace. Defaults
            to `256`.
        log_dir: TensorBoard run directory, or `None` for no TensorBoard
            output. Defaults to `None`.
        update_freq: write scalars every this many steps. Defaults to `50`.
        histogram_freq: write gradient histograms every this many steps; 0
            for none. Defaults to `0`.
        histogram_buckets: buckets per histogram. Defaults to `30`.
        run_dir: a directory to write the whole run into, as it goes (see
            `keras_gradtools.runs`): the per-step norms and skipped steps,
            the History, the `GradientMonitor`'s findings, the model
            summary and the optimizer's config. `gradtools diagnose`,
            `plot`, `report` and `compare` read it. It must not exist or be
            empty: a run is never written over (`FileExistsError` when
            training starts). The norms are rewritten at every epoch end
            and at most every `run_write_interval` seconds between, so an
            interrupted run leaves a readable directory. `None` for none.
            Defaults to `None`.
        run_write_interval: seconds between two writes of the norms into
            `run_dir` within an epoch. Defaults to `30`.
        probe_data: a fixed batch of inputs (a few dozen samples, as the
            model takes them) on which each hidden layer's activations are
            measured every `activation_freq` steps (see
            `keras_gradtools.activations`: mean, std, saturated fraction,
            dead units, mean local derivative), or `None` for no activation
            statistics. Defaults to `None`.
        activation_freq: steps between two activation probes (the first
            runs before step 0). Defaults to `200`.
        activation_layers: names of the layers to watch (also layers of a
            nested model or inside a custom layer), or `None` for every
            hidden layer with an activation, those of nested models,
            subclassed models and custom layers included (see
            `keras_gradtools.activations`). Defaults to `None`.
        activation_outputs: `fn(model, x) -> {layer_name: output}` giving
            the outputs to watch instead, named as layers of the model or of
            a model nested in it. Defaults to `None`.
        update_ratio: also record, per variable and step, the update-to-
            weight ratio `||w_after - w_before|| / ||w_before||` of the update
            the optimizer applied (`update_ratios`), taken in the train
            step; it costs a copy of the recorded weights per step, so it is
            off by default (docs/benchmarks.md has its measured cost).
            Defaults to `False`.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.Dense(3, name="hidden"),
    ...                           keras.layers.Dense(1, name="out")], name="net")
    >>> model.compile(optimizer="adam", loss="mse")
    >>> logger = GradNormLogger()
    >>> history = model.fit(np.ones((32, 4)), np.ones((32, 1)), batch_size=8,
    ...                     epochs=2, callbacks=[logger], verbose=0)
    >>> sorted(logger.history)
    ['net/hidden/kernel', 'net/out/kernel']
    >>> logger.history["net/out/kernel"].shape
    (8,)
    >>> len(history.history["grad_norm/net/out/kernel"])
    2
    """

    def __init__(self, include_biases=False, flush_every=256, log_dir=None,
                 update_freq=50, histogram_freq=0, histogram_buckets=30, run_dir=None,
                 run_write_interval=30, probe_data=None, activation_freq=200,
                 activation_layers=None, activation_outputs=None, update_ratio=False):
        super().__init__()
        for name, value, low in (("flush_every", flush_every, 1), ("update_freq", update_freq, 1),
                                 ("activation_freq", activation_freq, 1),
                                 ("histogram_freq", histogram_freq, 0),
                                 ("histogram_buckets", histogram_buckets, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(
                    f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
                )
        self.include_biases = include_biases
        self.flush_every = flush_every
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.run_dir = None if run_dir is None else os.fspath(run_dir)
        if not isinstance(run_write_interval, (int, float)) or run_write_interval < 0:
            raise ValueError(
                "`run_write_interval` must be a number of seconds >= 0. "
                f"Received: run_write_interval={run_write_interval!r}"
            )
        self.run_write_interval = run_write_interval
        self.probe_data = _check_probe_data(probe_data)
        self.activation_freq = activation_freq
        if activation_layers is not None and (
                isinstance(activation_layers, str)
                or not all(isinstance(n, str) for n in activation_layers)):
            raise ValueError("`activation_layers` must be a list of layer names or None. "
                             f"Received: activation_layers={activation_layers!r}")
        self.activation_layers = None if activation_layers is None else list(activation_layers)
        if activation_outputs is not None and not callable(activation_outputs):
            raise ValueError("`activation_outputs` must be a function `fn(model, x) -> "
                             "{layer_name: output}` or None. Received: "
                             f"activation_outputs={activation_outputs!r}")
        self.activation_outputs = activation_outputs
        if not isinstance(update_ratio, bool):
            raise ValueError(f"`update_ratio` must be True or False. Received: "
                             f"update_ratio={update_ratio!r}")
        self.update_ratio = update_ratio
        self.activations = ActivationRecord()
        self.update_recorder = None
        self._probe = None
        self._steps_begun = 0
        self._next_probe = 0
        self._run_written = None
        self._describe_when_built = False
        self._epoch_history = {}
        self.update_freq = update_freq
        self.histogram_freq = histogram_freq
        self.histogram_buckets = histogram_buckets
        self.writer = None
        self.is_chief = True
        self._first_iteration = 0
        self.recorder = None
        self.applied_recorder = None
        self.epoch_end_steps = []
        self._restore = None
        self._calls_since_flush = 0
        self._steps_per_call = 1
        self._readers = []
        # Rows (and histogram steps) already handed to the TensorBoard
        # writer and the readers: moved by `flush()` alone.
        self._published = 0
        self._histograms_published = 0

    # ------------------------------------------------------------------
    # Results
    # ------------------------------------------------------------------

    @property
    def keys(self):
        """The recorded variables' keys, in `trainable_variables` order."""
        return list(self.recorder.keys) if self.recorder else []

    @property
    def norms(self):
        """All recorded norms as a `(steps, len(keys))` float64 array."""
        if self.recorder is None:
            return np.zeros((0, 0))
        return self.recorder.norms

    @property
    def history(self):
        """Dict `key -> 1-D array` of per-step norms of the last `fit()`."""
        if self.recorder is None:
            return {}
        return self.recorder.history

    @property
    def global_norms(self):
        """1-D array: the norm of all recorded gradients together, per step."""
        return norms_lib.global_norm(self.norms) if self.recorder else np.zeros(0)

    @property
    def skipped_steps(self):
        """1-D int array: the steps the loss-scale optimizer skipped.

        Under `mixed_float16`, Keras' `LossScaleOptimizer` skips a step whose
        scaled gradients overflow and halves its scale: that is its normal
        working, not an exploding gradient. Those steps are recorded (their
        norms are non-finite, or NaN under several replicas) and listed
        here; `GradientMonitor` does not judge them.
        """
        if self.recorder is None:
            return np.zeros(0, int)
        return np.flatnonzero(self.recorder.skipped)

    @property
    def applied_history(self):
        """Dict `key -> 1-D array` of post-clipping norms, or `{}`.

        Filled when the optimizer clips (Keras' `clipnorm`, `clipvalue`,
        `global_clipnorm`, or a `ClippedOptimizer`): the norms of the
        gradients the optimizer actually applied, step by step, beside the
        raw ones in `history`. Not with Keras' own clipping under
        `gradient_accumulation_steps` from Keras 3.5 on, which clips the
        accumulated mean once every N steps (`{}` then; Keras 3.3 and 3.4
        clip each batch's gradient, and that is recorded); a
        `ClippedOptimizer` clips each batch's gradient before its inner
        optimizer accumulates it, and that is what is recorded.
        """
        if self.applied_recorder is None:
            return {}
        return self.applied_recorder.history

    @property
    def applied_global_norms(self):
        """1-D array: the global norm after clipping, per step (or empty)."""
        if self.applied_recorder is None:
            return np.zeros(0)
        return norms_lib.global_norm(self.applied_recorder.norms)

    @property
    def update_ratios(self):
        """Dict `key -> 1-D array` of per-step update-to-weight ratios, or `{}`.

        Filled with `update_ratio=True`: `||w_after - w_before|| / ||w_before||`
        of each recorded variable at each step, from the update the
        optimizer applied (NaN where the weight was 0; 0 on a skipped step).
        """
        if self.update_recorder is None:
            return {}
        return self.update_recorder.history

    def save(self, path):
        """Writes the per-step norms to a `.csv` or `.json` file.

        The CSV has a header `step,epoch,global,<key>...` and one row per
        step; the JSON holds `keys`, `epoch_end_steps` and `norms` (a list
        of rows; non-finite values are written as the strings `"nan"`,
        `"inf"`, `"-inf"`), `skipped_steps` (see `skipped_steps`), and
        `applied_norms` (post-clipping) when the optimizer clips. The file must not exist yet.

        Args:
            path: destination, ending in `.csv` or `.json`.

        Returns:
            The path written.

        Raises:
            ValueError: for another extension.
            FileExistsError: if `path` already exists.
        """
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".csv", ".json"):
            raise ValueError(
                "`path` must end in '.csv' or '.json'. "
                f"Received: path={path!r}"
            )
        norms = self.norms
        with open(path, "x", newline="") as f:
            if ext == ".csv":
                writer = csv.writer(f)
                writer.writerow(["step", "epoch", "global"] + self.keys)
                for step, row in enumerate(norms):
                    writer.writerow(
                        [step, diagnose.epoch_of_step(step, self.epoch_end_steps) - 1,
                         repr(float(norms_lib.global_norm(row)))]
                        + [repr(float(v)) for v in row]
                    )
            else:
                json.dump(self._recording_data(), f)
        return path

    def _recording_data(self):
        """The recording as `grad_norms.json` holds it (see `save`)."""
        data = {
            "keys": self.keys,
            "epoch_end_steps": list(self.epoch_end_steps),
            "skipped_steps": [int(i) for i in self.skipped_steps],
            "norms": [[runs.json_float(v) for v in row] for row in self.norms],
        }
        if self.applied_recorder is not None:
            data["applied_norms"] = [
                [runs.json_float(v) for v in row] for row in self.applied_recorder.norms
            ]
        if self.update_recorder is not None:
            data["update_ratios"] = [
                [runs.json_float(v) for v in row] for row in self.update_recorder.norms
            ]
        return data

    # ------------------------------------------------------------------
    # The run directory
    # ------------------------------------------------------------------

    def _start_run(self):
        """Writes into the claimed `run_dir` what is known before training."""
        self._run_started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._describe_model()
        self._run_written = time.monotonic()
        self._write_run(force=True)  # a readable run from the start, with no step yet

    def _describe_model(self):
        """Writes the model's summary and the run's config (again once a late-built model is built)."""
        from keras_gradtools import __version__

        model, optimizer = self.model, self.model.optimizer
        # A model built inside fit() (TensorFlow) is described again at the first epoch's end.
        self._describe_when_built = not model.built
        summary = io.StringIO()
        try:
            model.summary(print_fn=lambda line, *args, **kwargs: summary.write(line + "\n"))
        except ValueError:  # a subclassed model that is not built yet
            summary.write(f"{model.name}: not built before fit(); no summary.\n")
        runs.write_text(os.path.join(self.run_dir, "model_summary.txt"), summary.getvalue())
        runs.write_json(os.path.join(self.run_dir, "config.json"), {
            "format": runs.FORMAT,
            "keras_gradtools_version": __version__,
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
            "model": model.name,
            "optimizer_config": (runs.optimizer_config(optimizer)
                                 if optimizer is not None else None),
            "clipping": clipping.describe_clipping(optimizer),
            "model_facts": model_facts(model).to_dict(),
            "fit": {k: v for k, v in (self.params or {}).items()
                    if isinstance(v, (int, float, str, type(None)))},
            "logger": {"include_biases": self.include_biases, "flush_every": self.flush_every,
                       "log_dir": self.log_dir, "update_freq": self.update_freq,
                       "histogram_freq": self.histogram_freq},
            "started": self._run_started,
        })

    def _write_run(self, force):
        """Rewrites the norms and the History in `run_dir` (now, or when the interval is up)."""
        if self._run_written is None:
            return
        if not force and time.monotonic() - self._run_written < self.run_write_interval:
            return
        runs.write_json(os.path.join(self.run_dir, "grad_norms.json"), self._recording_data())
        runs.write_json(os.path.join(self.run_dir, "history.json"), self._epoch_history)
        if self._probe is not None:
            runs.write_json(os.path.join(self.run_dir, "activations.json"),
                            self.activations.to_dict())
        self._run_written = time.monotonic()

    def write_findings(self, report):
        """Writes a `GradientMonitor`'s report into `run_dir` (no-op without one)."""
        if self._run_written is not None:
            runs.write_text(os.path.join(self.run_dir, "diagnosis.json"),
                            report.to_json(indent=1))

    # ------------------------------------------------------------------
    # Readers (GradientMonitor, TensorBoard writers) subscribe here
    # ------------------------------------------------------------------

    def _add_reader(self, reader):
        """Calls `reader(first_step, new_rows, skipped)` after every flush."""
        if reader not in self._readers:
            self._readers.append(reader)

    def _remove_reader(self, reader):
        if reader in self._readers:
            self._readers.remove(reader)

    def flush(self):
        """Publishes the steps recorded since the last flush.

        Copies them from the device, writes their TensorBoard events and
        hands them to the readers (`GradientMonitor`). Reading `history`,
        `norms` or `global_norms` in between publishes nothing and hides
        nothing: the next flush publishes every step since this one.

        Returns:
            The new rows, a `(new_steps, len(keys))` array.
        """
        self._calls_since_flush = 0
        if self.recorder is None:
            return np.zeros((0, 0))
        norms = self.recorder.norms
        first, self._published = self._published, len(norms)
        rows = norms[first:]
        applied = None
        if self.applied_recorder is not None:
            # Copied at the same pace as the norms: its ring buffer is as small.
            applied = self.applied_recorder.norms[first:first + len(rows)]
        if self.update_recorder is not None:
            self.update_recorder.flush()  # the same: its ring buffer is as small
        if self.writer is not None:
            self._write_summaries(first, rows, applied)
        if len(rows):
            skipped = self.recorder.skipped[first:]
            for reader in list(self._readers):
                reader(first, rows, skipped)
            self._write_run(force=False)
        return rows

    def tensorboard_step(self, step):
        """The TensorBoard step of a recorded step: the optimizer's step after it."""
        return self._first_iteration + int(step) + 1

    def _write_summaries(self, first, rows, applied):
        index = np.arange(first, first + len(rows))
        keep = index % self.update_freq == 0
        if keep.any():
            steps = [self.tensorboard_step(i) for i in index[keep]]
            self.writer.scalars(steps, self.keys, rows[keep],
                                norms_lib.global_norm(rows[keep]))
            if applied is not None and len(applied) == len(rows):
                self.writer.applied_scalars(steps, norms_lib.global_norm(applied[keep]))
        for step, buckets in self.recorder.histograms(since=self._histograms_published):
            self.writer.histograms(self.tensorboard_step(step), buckets)
            self._histograms_published = step + 1
        self.writer.flush()

    def write_text(self, tag, text, step):
        """Writes a text summary at a recorded step (no-op without `log_dir`)."""
        if self.writer is not None:
            self.writer.text(tag, text, self.tensorboard_step(step))

    # ------------------------------------------------------------------
    # Callback hooks
    # ------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        tap.check_backend()
        self.is_chief = True
        if keras.backend.backend() == "tensorflow":
            strategy = (getattr(self.model, "distribute_strategy", None)
                        or tf.distribute.get_strategy())
            replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
            if replicas > 1:
                _check_strategy(strategy, self.model.optimizer)
                internals.check_replicas_supported(replicas)
            # Under MultiWorkerMirroredStrategy every worker records (the
            # same numbers); only the chief writes TensorBoard events.
            self.is_chief = tap.is_chief(strategy)
        self._steps_per_call = max(
            1, int(getattr(self.model, "steps_per_execution", 1) or 1)
        )
        if self.log_dir is not None and self.is_chief:
            from keras_gradtools.summaries import GradientSummaryWriter

            GradientSummaryWriter.check_new(self.log_dir)
        optimizer = self.model.optimizer
        # On TensorFlow a model not built before fit() creates its variables
        # in the traced step: the tap binds the recorders there.
        variables = (None if keras.backend.backend() == "tensorflow" and not self.model.built
                     else self.model.trainable_variables)
        recorder = GradNormRecorder(
            variables,
            include_biases=self.include_biases,
            capacity=self.flush_every + 2 * self._steps_per_call + 1,
            histogram_freq=self.histogram_freq if self.log_dir and self.is_chief else 0,
            histogram_buckets=self.histogram_buckets,
        )
        applied_recorder = None
        if clipping.clips(optimizer) and not _clips_accumulated_mean(optimizer):
            applied_recorder = GradNormRecorder(
                variables,
                include_biases=self.include_biases,
                capacity=recorder.capacity,
            )
        update_recorder = None
        if self.update_ratio:
            update_recorder = GradNormRecorder(
                variables,
                include_biases=self.include_biases,
                capacity=recorder.capacity,
            )
        probe = None
        if self.probe_data is not None:
            # Built and run once here: a subclassed model, an unknown layer or
            # probe data of the wrong shape is refused before any step.
            probe = ActivationProbe(self.model, self.probe_data, self.activation_layers,
                                    self.activation_outputs)
            first_stats = _run_probe(probe)
        if self.run_dir is not None and self.is_chief:
            runs.new_run_dir(self.run_dir)  # refused before anything else changes
        # A fresh recording: the previous fit's is kept until here.
        self.recorder, self.applied_recorder = recorder, applied_recorder
        self.update_recorder = update_recorder
        self._probe = probe
        self.activations = ActivationRecord()
        self._steps_begun = 0
        self._next_probe = self.activation_freq
        self.epoch_end_steps = []
        self._calls_since_flush = 0
        self._published = 0
        self._histograms_published = 0
        self._epoch_history = {}
        self._run_written = None
        self._describe_when_built = False
        self._first_iteration = _iterations(optimizer)
        if self.run_dir is not None and self.is_chief:
            self._start_run()
        if self.log_dir is not None and self.is_chief:
            self.writer = GradientSummaryWriter(self.log_dir)
        if probe is not None:
            self._keep_probe(0, first_stats)
        self._restore = tap.instrument_model(
            self.model, [self.recorder],
            applied_recorders=[self.applied_recorder] if self.applied_recorder else [],
            update_recorders=[self.update_recorder] if self.update_recorder else [],
        )

    def _keep_probe(self, step, stats_and_outputs):
        """Stores one probe's statistics (taken before `step`) and writes their summaries."""
        stats, outputs = stats_and_outputs
        self.activations.append(step, stats)
        if self.writer is not None:
            self.writer.activations(self._first_iteration + step, stats, outputs,
                                    self.histogram_buckets)

    # Keras dispatches batch-*end* hooks asynchronously only when no
    # callback overrides them, so the logger uses the batch-begin hook, which
    # is called with no logs and costs a Python call per step.
    def on_train_batch_begin(self, batch, logs=None):
        if self._probe is not None and self._steps_begun >= self._next_probe:
            # `self.model` syncs the JAX trainer's state into the variables.
            self._probe.model = self.model
            self._keep_probe(self._steps_begun, _run_probe(self._probe))
            self._next_probe = (self._steps_begun - self._steps_begun % self.activation_freq
                                + self.activation_freq)
        self._steps_begun += self._steps_per_call
        self._calls_since_flush += 1
        if self._calls_since_flush * self._steps_per_call >= self.flush_every:
            self.flush()

    def on_epoch_end(self, epoch, logs=None):
        self.flush()
        if self._describe_when_built and self.model.built:
            self._describe_model()
        norms = self.norms
        start = self.epoch_end_steps[-1] if self.epoch_end_steps else 0
        self.epoch_end_steps.append(len(norms))
        epoch_rows = norms[start:]
        if not len(epoch_rows):
            return
        with np.errstate(all="ignore"):
            means = epoch_rows.mean(axis=0)
        history = getattr(self.model, "history", None)
        if history is not None and hasattr(history, "history"):
            for key, mean in zip(self.keys, means):
                history.history.setdefault(f"grad_norm/{key}", []).append(
                    float(mean)
                )
        if logs is not None:
            globals_ = norms_lib.global_norm(epoch_rows)
            logs["grad_norm_max/global"] = float(_nan_aware_max(globals_))
        if self._run_written is not None:
            for name, value in (logs or {}).items():
                try:
                    value = runs.json_float(value)
                except (TypeError, ValueError):
                    continue
                self._epoch_history.setdefault(name, []).append(value)
            for key, mean in zip(self.keys, means):
                self._epoch_history.setdefault(f"grad_norm/{key}", []).append(
                    runs.json_float(mean))
            self._write_run(force=True)

    def on_train_end(self, logs=None):
        try:
            self.flush()
            self._write_run(force=True)
        finally:
            if self._restore is not None:
                self._restore()
                self._restore = None
            if self.writer is not None:
                self.writer.close()
                self.writer = None


def _clips_accumulated_mean(optimizer):
    """Whether Keras' own clipping acts on an accumulated mean (`gradient_accumulation_steps`).

    Keras (3.5 on) then clips the mean of N batches' gradients once every N
    steps: no per-step post-clipping gradient exists to record.
    """
    found = clipping.layout(optimizer)
    return (bool(found.keras_clipping)
            and bool(getattr(found.base, "gradient_accumulation_steps", None))
            and internals.keras_clips_accumulated_mean())


def _iterations(optimizer):
    """The optimizer's `iterations` as an int (0 without one).

    A Keras variable, or with `gradient_accumulation_steps` a tensor of the
    backend's (a JAX array has no `.numpy()`). On TensorFlow both have
    `numpy()` (a variable's value may be a `tf.distribute` mirrored variable,
    which `int()` refuses); on JAX and PyTorch it is `int()` of the
    variable's value, or of the tensor (a variable's `numpy()` goes through
    `np.array` there, which NumPy 2 warns about).
    """
    if optimizer is None:
        return 0
    iterations = optimizer.iterations
    if keras.backend.backend() == "tensorflow":
        return int(iterations.numpy())
    return int(getattr(iterations, "value", iterations))


def _check_probe_data(data):
    """`probe_data` as given, after refusing an empty or non-finite batch."""
    if data is None:
        return None
    arrays = list(data.values()) if isinstance(data, dict) else (
        list(data) if isinstance(data, (list, tuple)) else [data])
    for array in arrays:
        try:
            values = np.asarray(array)
        except (TypeError, ValueError):
            continue  # a tensor type NumPy cannot read here: checked when probed
        if values.ndim == 0 or len(values) == 0:
            raise ValueError("`probe_data` must be a non-empty batch of inputs. Received: "
                             f"probe_data with shape {values.shape}")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError("`probe_data` holds NaN or Inf values; activation statistics "
                             "need finite inputs. Received: probe_data with "
                             f"{int((~np.isfinite(values)).sum())} non-finite values")
    return data


def _run_probe(probe):
    """`(stats, outputs)` of one probe, the outputs kept for TensorBoard histograms."""
    stats = probe()
    return stats, probe.last_outputs


_SUPPORTED_STRATEGIES = ("MirroredStrategy", "MultiWorkerMirroredStrategy",
                         "CollectiveAllReduceStrategy")


def _check_strategy(strategy, optimizer):
    """Refuses strategies whose all-reduce the logger cannot see, and gradient accumulation
    (which Keras' trainer cannot run there); warns on per-replica clipping."""
    name = type(strategy).__name__
    if name not in _SUPPORTED_STRATEGIES:
        raise ValueError(
            "GradNormLogger records the all-reduced gradient under MirroredStrategy and "
            "MultiWorkerMirroredStrategy; with several replicas it does not support "
            f"{name}. Received: strategy={name} with "
            f"{strategy.num_replicas_in_sync} replicas"
        )
    layout = clipping.layout(optimizer)
    accumulation = (getattr(optimizer, "gradient_accumulation_steps", None)
                    or getattr(layout.base, "gradient_accumulation_steps", None))
    if accumulation:
        raise ValueError(
            "Keras' TensorFlow trainer cannot apply `gradient_accumulation_steps` under "
            f"{name} with {strategy.num_replicas_in_sync} replicas: the optimizer's "
            "all-reduce would run inside a conditional, where tf.distribute refuses it "
            "(fit() fails the same way without keras_gradtools). Train on one replica, or "
            "without gradient accumulation. Received: "
            f"gradient_accumulation_steps={accumulation}"
        )
    own = list(layout.keras_clipping)
    if own:
        warnings.warn(
            f"Under {name} with {strategy.num_replicas_in_sync} replicas, Keras applies "
            f"{own[0]} to each replica's share of the gradient before summing them, so "
            "the clipping is not that of the global gradient, and the pre-clipping norm "
            "of the summed gradient is never formed: GradNormLogger records the summed, "
            "applied gradient in both `history` and `applied_history`. For clipping on the "
            "summed gradient use `keras_gradtools.clipping.clipped_optimizer(...)` "
            "created inside `strategy.scope()`.",
            stacklevel=3,
        )


def _nan_aware_max(values):
    """Largest value; NaN if any value is NaN (a NaN step must show)."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return np.nan
    if np.isnan(values).any():
        return np.nan
    return values.max()


class GradientProblemError(RuntimeError):
    """Raised by `GradientMonitor` for a finding whose action is `"raise"`.

    Attributes:
        finding: the `keras_gradtools.diagnose.Finding`.
    """

    def __init__(self, finding):
        super().__init__(str(finding))
        self.finding = finding


_ACTIONS = ("warn", "stop", "raise", "ignore")
DEFAULT_ACTIONS = {
    "vanishing": "warn",
    "exploding": "warn",
    "dead_layer": "warn",
    "saturation": "warn",
    "dead_units": "warn",
    "update_ratio": "warn",
    "nonfinite": "stop",
}


class GradientMonitor(keras.callbacks.Callback):
    """Judges gradient norms while training: vanishing, exploding, NaN/Inf.

    The monitor runs the rules of `keras_gradtools.diagnose` (each a pure
    function, see there for what fires and the default thresholds) over the
    norms as they are recorded, every `check_every` steps, and keeps the
    findings: kind, first step and epoch, the variables involved (input to
    output), the evidence, and the fixes to try. `report()` returns them;
    `str(monitor.report())` is the text a person reads.

    It reads the recording of the `GradNormLogger` given as `logger`
    (nothing is recorded twice; the logger is made to flush at least every
    `check_every` steps), or, alone, records with a logger of its own
    (`monitor.logger`).

    Actions per kind: `"warn"` prints the finding once; `"stop"` prints it
    and sets `model.stop_training` (training ends after the current step;
    everything recorded so far is kept and the logger's files are written
    as usual); `"raise"` raises `GradientProblemError` carrying the finding;
    `"ignore"` only keeps it in the report. Defaults: warn for `vanishing`,
    `exploding`, `dead_layer`, `saturation`, `dead_units` and
    `update_ratio`, stop for `nonfinite`. A spike that the optimizer's
    clipping absorbed is no finding: the report lists it among its
    `absorbed_spikes`.

    With activation statistics (`probe_data`, here or on the logger) the
    monitor also judges the activations (`saturation`, `dead_units`) and a
    `vanishing` finding states its cause; with `update_ratio=True`, the
    update-to-weight ratio (`update_ratio`). See `keras_gradtools.diagnose`.

    Steps that a loss-scale optimizer skipped (`GradNormLogger.skipped_steps`)
    are its normal working under `mixed_float16` and are not judged; a run of
    more than 10 of them in a row once training has started (64 for the
    opening calibration of the scale) is a `nonfinite` finding. Under
    `tf.distribute` the monitor judges the all-reduced gradient's norms, the
    same numbers as on one device.

    Args:
        logger: the `GradNormLogger` to read, or `None` for one of its own.
            Defaults to `None`.
        actions: per-kind overrides of the actions. Defaults to `None`.
        thresholds: per-rule overrides of the thresholds, e.g.
            `{"vanishing": {"ratio": 1e-4, "patience": 100}}`. Defaults to
            `None`.
        check_every: steps between checks (each one reads the recording from
            the device). Defaults to `100`.
        verbose: print findings as they are found (0 or 1). Defaults to `1`.
        probe_data: for the monitor's own logger: a fixed batch of inputs
            for activation statistics (see `GradNormLogger`), which add the
            `saturation` and `dead_units` rules and the cause of a
            `vanishing` finding. Defaults to `None`.
        update_ratio: for the monitor's own logger: record update-to-weight
            ratios, which add the `update_ratio` rule. Defaults to `False`.

    Example:

    >>> import keras, numpy as np
    >>> from keras_gradtools import create_deep_sigmoid_model
    >>> keras.utils.set_random_seed(0)
    >>> model = create_deep_sigmoid_model(num_layers=10, units=32, input_dim=8)
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> monitor = GradientMonitor(check_every=20, verbose=0)
    >>> x, y = np.random.rand(640, 8), np.random.randint(0, 10, 640)
    >>> _ = model.fit(x, y, batch_size=8, epochs=1, callbacks=[monitor], verbose=0)
    >>> finding = monitor.report().first("vanishing")
    >>> finding.layers[0], finding.step
    ('deep_sigmoid/dense_0/kernel', 0)
    """

    def __init__(self, logger=None, actions=None, thresholds=None, check_every=100,
                 verbose=1, probe_data=None, update_ratio=False):
        super().__init__()
        if logger is not None and (probe_data is not None or update_ratio):
            raise ValueError(
                "Give `probe_data` and `update_ratio` to the GradNormLogger passed as "
                "`logger` (the monitor reads what it records), not to the monitor. "
                f"Received: probe_data={'given' if probe_data is not None else None}, "
                f"update_ratio={update_ratio!r} with logger={logger!r}")
        self.probe_data = probe_data
        self.update_ratio = update_ratio
        self._probes_fed = 0
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(
                "`check_every` must be a positive integer. "
                f"Received: check_every={check_every}"
            )
        if logger is not None and not isinstance(logger, GradNormLogger):
            raise ValueError(
                "`logger` must be a GradNormLogger or None. "
                f"Received: logger={logger!r}"
            )
        actions = dict(actions or {})
        for kind, action in actions.items():
            if kind == "clipped_spike":
                raise ValueError(
                    "`clipped_spike` is no finding kind any more: a spike that the "
                    "optimizer's clipping absorbed is listed in `report().absorbed_spikes`, "
                    f"with no action. Received: actions={actions!r}"
                )
            if kind not in diagnose.KINDS:
                raise ValueError(
                    f"Unknown finding kind in `actions`; the kinds are "
                    f"{', '.join(diagnose.KINDS)}. Received: actions={actions!r}"
                )
            if action not in _ACTIONS:
                raise ValueError(
                    f"Unknown action for {kind!r}; use one of {', '.join(_ACTIONS)}. "
                    f"Received: actions={actions!r}"
                )
        diagnose.Diagnoser([], thresholds=thresholds)  # validates the rule names
        self.actions = {**DEFAULT_ACTIONS, **actions}
        self.thresholds = thresholds
        self.check_every = check_every
        self.verbose = verbose
        self.logger = logger
        self._owns_logger = logger is None
        self.diagnoser = None
        self._announced = set()

    # The monitor is a reader of the logger's flushes.
    def _on_rows(self, first_step, rows, skipped=None):
        if self.diagnoser is None:
            self.diagnoser = diagnose.Diagnoser(
                self.logger.keys, thresholds=self.thresholds,
                clipping=clipping.describe_clipping(self.model.optimizer),
                facts=model_facts(self.model),
            )
        record = self.logger.activations
        probes = list(zip(record.steps[self._probes_fed:], record.stats[self._probes_fed:]))
        self._probes_fed = len(record.steps)
        new = self.diagnoser.feed_activations(probes)
        new += self.diagnoser.feed(first_step, rows, skipped)
        if self.logger.update_recorder is not None:
            updates = self.logger.update_recorder.norms[first_step:first_step + len(rows)]
            new += self.diagnoser.feed_updates(first_step, updates, skipped[:len(updates)]
                                               if skipped is not None else None)
        for finding in new:
            finding.epoch = diagnose.epoch_of_step(
                finding.step, self.logger.epoch_end_steps
            )
            self._act(finding)

    def _act(self, finding):
        self.logger.write_text("gradtools/findings", str(finding), finding.detected_step)
        self.logger.write_findings(self.report())
        action = self.actions.get(finding.kind, "warn")
        if action == "ignore":
            return
        if action == "raise":
            raise GradientProblemError(finding)
        if finding.kind not in self._announced and self.verbose:
            self._announced.add(finding.kind)
            verb = "stopping training" if action == "stop" else "warning"
            print(f"\nGradientMonitor ({verb}): {finding}", flush=True)
        if action == "stop":
            self.model.stop_training = True

    def report(self):
        """The findings so far, as a `keras_gradtools.diagnose.Report`."""
        if self.diagnoser is None:
            return diagnose.Report(findings=[], steps=0,
                                   keys=self.logger.keys if self.logger else [])
        return self.diagnoser.report(self.logger.epoch_end_steps)

    # ------------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        if self._owns_logger and self.logger is not None:
            self.logger.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        if self._owns_logger and self.logger is not None:
            self.logger.set_params(params)

    def on_train_begin(self, logs=None):
        self.diagnoser = None
        self._announced = set()
        self._probes_fed = 0
        if self._owns_logger:
            if self.logger is None:
                self.logger = GradNormLogger(flush_every=self.check_every,
                                             probe_data=self.probe_data,
                                             update_ratio=self.update_ratio)
                self.logger.set_model(self.model)
                self.logger.set_params(self.params)
            self.logger.on_train_begin(logs)
        else:
            self.logger.flush_every = min(self.logger.flush_every, self.check_every)
        self.logger._add_reader(self._on_rows)

    def on_train_batch_begin(self, batch, logs=None):
        if self._owns_logger:
            self.logger.on_train_batch_begin(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._owns_logger:
            self.logger.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        try:
            if self._owns_logger:
                self.logger.on_train_end(logs)
            else:
                self.logger.flush()
            self.logger.write_findings(self.report())
        finally:
            self.logger._remove_reader(self._on_rows)
