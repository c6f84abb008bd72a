"""TensorBoard output of gradient norms, histograms and findings.

Layout: `GradNormLogger(log_dir="logs/run1")` writes into `logs/run1/train`,
the directory Keras' own `TensorBoard(log_dir="logs/run1")` callback uses
for its training scalars, so `tensorboard --logdir logs` shows one run
`run1/train` with Keras' loss/accuracy and our `grad_norm/*` side by side.
Steps are the optimizer's step after the update (1, 2, ...), the step
Keras' TensorBoard callback uses for batch-level scalars.

Our events go to a file of their own (suffix `.gradtools`); a directory that
already holds one belongs to an earlier run and is refused, so a run's logs
are never mixed with, or written over, another's.
"""

import glob
import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata

SUFFIX = ".gradtools"


class GradientSummaryWriter:
    """Writes `grad_norm/*` scalars, `grad_hist/*` histograms and finding texts.

    Args:
        log_dir: the run directory (events go to `log_dir/train`).

    Raises:
        FileExistsError: if `log_dir/train` already holds keras_gradtools
            events from another run.
    """

    def __init__(self, log_dir):
        self.log_dir = os.fspath(log_dir)
        self.train_dir = os.path.join(self.log_dir, "train")
        existing = glob.glob(os.path.join(self.train_dir, f"events.out.tfevents.*{SUFFIX}"))
        if existing:
            raise FileExistsError(
                f"{self.train_dir} already holds the gradient summaries of an earlier "
                f"run ({os.path.basename(existing[0])}); keras_gradtools never writes "
                f"over a run's logs. Choose a new log_dir. Received: log_dir={self.log_dir!r}"
            )
        os.makedirs(self.train_dir, exist_ok=True)
        self._writer = tf.summary.create_file_writer(self.train_dir, filename_suffix=SUFFIX)
        self._metadata = histogram_metadata.create_summary_metadata(
            display_name=None, description="gradient values (keras_gradtools)"
        ).SerializeToString()

    def scalars(self, steps, keys, rows, global_norms):
        """Writes one `grad_norm/<key>` per key and `grad_norm/global` per step."""
        with self._writer.as_default():
            for step, row, g in zip(steps, rows, global_norms):
                step = int(step)
                for key, value in zip(keys, row):
                    tf.summary.scalar(f"grad_norm/{key}", float(value), step=step)
                tf.summary.scalar("grad_norm/global", float(g), step=step)

    def applied_scalars(self, steps, rows_global):
        """Writes `grad_norm_applied/global` (post-clipping) per step."""
        with self._writer.as_default():
            for step, g in zip(steps, rows_global):
                tf.summary.scalar("grad_norm_applied/global", float(g), step=int(step))

    def histograms(self, step, buckets_by_key):
        """Writes `grad_hist/<key>` from precomputed `[left, right, count]` rows."""
        with self._writer.as_default():
            for key, buckets in buckets_by_key.items():
                tf.summary.write(
                    f"grad_hist/{key}", tf.constant(np.asarray(buckets, np.float64)),
                    step=int(step), metadata=self._metadata,
                )

    def text(self, tag, text, step):
        """Writes a text summary (a finding) at `step`."""
        with self._writer.as_default():
            tf.summary.text(tag, text, step=int(step))
        self._writer.flush()

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()
