"""Run directories: what a training run leaves on disk, and reading it back.

A run directory is written by `GradNormLogger(run_dir=...)` during any
`fit()`, or by `gradtools reproduce` (`experiments.run_experiment`). Every
`gradtools` command that reads runs (`diagnose`, `plot`, `report`,
`compare`) reads it with `load_run`. Layout (format 1):

```
config.json        format, versions, backend, model name, optimizer config and clipping
grad_norms.json    keys, epoch_end_steps, skipped_steps, norms (and applied_norms)
history.json       Keras' per-epoch History (loss, metrics, grad_norm/* means)
diagnosis.json     the GradientMonitor's report, when one ran
model_summary.txt  the model's summary (logger runs)
summary.json, grad_norms.csv, *.png   (reproduced runs)
```

Files are replaced whole (written beside, then renamed), so a run that is
interrupted leaves every file readable. A run directory is never reused.
"""

import dataclasses
import json
import os
import warnings

import numpy as np

from keras_gradtools.diagnose import Report

FORMAT = 1


class RunError(ValueError):
    """A path that is not a readable run directory; the message says why."""


def new_run_dir(path):
    """Creates an empty run directory at `path`; refuses one that holds anything.

    Args:
        path: the directory (its parents are created).

    Returns:
        The path, a string.

    Raises:
        FileExistsError: if `path` exists and is not an empty directory.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"{path} is a file, not a directory; a run_dir is a directory that "
            f"keras_gradtools creates. Received: run_dir={path!r}")
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(
            f"{path} already exists and is not empty; keras_gradtools never writes over a "
            f"run. Choose a new run_dir. Received: run_dir={path!r}"
        )
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path, data):
    """Writes JSON to `path` whole: a reader sees the old file or the new one."""
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def write_text(path, text):
    """Writes text to `path` whole (see `write_json`)."""
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def optimizer_config(optimizer):
    """`keras.optimizers.serialize(optimizer)`, without the warning NumPy 2 raises in it.

    On JAX and PyTorch Keras' `get_config` copies the learning rate through
    `np.array(variable)`, which NumPy 2 answers with a `DeprecationWarning`
    about `__array__`'s `copy` keyword: Keras' own, ignored here.
    """
    import keras

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copy keyword", category=DeprecationWarning)
        return keras.optimizers.serialize(optimizer)


def json_float(value):
    """A float for JSON: non-finite values as the strings "nan", "inf", "-inf"."""
    value = float(value)
    if np.isfinite(value):
        return value
    return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return json_float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@dataclasses.dataclass
class Run:
    """A run read back from its directory (see `load_run`).

    Attributes:
        path: the directory.
        keys: the recorded variables, input to output.
        norms: `(steps, len(keys))` float array of per-step norms.
        epoch_end_steps: steps done at the end of each epoch.
        skipped_steps: steps a loss-scale optimizer skipped.
        applied_norms: post-clipping norms, or `None`.
        history: Keras' per-epoch History as floats (`{}` if not saved).
        findings: the monitor's findings as dicts (`[]` if none ran).
        absorbed_spikes: the spikes the optimizer's clipping absorbed, as
            the monitor's report lists them (`[]` if none, or no monitor).
        config: `config.json` (`{}` if absent).
        activations: the activation probes, a
            `keras_gradtools.activations.ActivationRecord` (empty if the run
            had no `probe_data`).
        update_ratios: `(steps, len(keys))` update-to-weight ratios, or
            `None`.
    """

    path: str
    keys: list
    norms: np.ndarray
    epoch_end_steps: list
    skipped_steps: list
    applied_norms: object = None
    history: dict = dataclasses.field(default_factory=dict)
    findings: list = dataclasses.field(default_factory=list)
    absorbed_spikes: list = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)
    activations: object = None
    update_ratios: object = None

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def global_norms(self):
        from keras_gradtools.norms import global_norm

        return global_norm(self.norms)

    @property
    def applied_global_norms(self):
        from keras_gradtools.norms import global_norm

        return None if self.applied_norms is None else global_norm(self.applied_norms)


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{what} is missing: no file at {path}") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{what} at {path} cannot be read ({e})") from None


def _rows(data, width, where):
    rows = np.array([[float(v) for v in row] for row in data], dtype=float)
    if rows.size == 0:
        return np.zeros((0, width))
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"{where}: rows of {rows.shape[1:]} values for {width} keys")
    return rows


def load_run(path):
    """Reads a run directory; a `RunError` naming what is wrong if it is not one.

    Args:
        path: the run directory.

    Returns:
        A `Run`.

    Raises:
        RunError: for a missing directory, one that is not a run, a
            truncated or hand-edited file, or a run written by a newer
            version of keras_gradtools.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise RunError(f"{path} is not a directory")
    norms_path = os.path.join(path, "grad_norms.json")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(norms_path) and not os.path.exists(config_path):
        raise RunError(
            f"{path} is not a keras_gradtools run directory (it has neither "
            "grad_norms.json nor config.json); pass a directory written by "
            "GradNormLogger(run_dir=...) or `gradtools reproduce`"
        )
    config = {}
    if os.path.exists(config_path):
        config = _read_json(config_path, "config.json")
        if not isinstance(config, dict):
            raise RunError(f"{config_path} is not a run's config (not a JSON object)")
        version = config.get("format", FORMAT)
        if not isinstance(version, int) or version > FORMAT:
            raise RunError(
                f"{path} was written by a newer keras_gradtools (run format {version!r}; "
                f"this version reads format {FORMAT}): upgrade keras_gradtools to read it"
            )
    data = _read_json(norms_path, "the recorded norms (grad_norms.json)")
    try:
        keys = [str(k) for k in data["keys"]]
        norms = _rows(data["norms"], len(keys), "norms")
        epoch_end_steps = [int(s) for s in data.get("epoch_end_steps", [])]
        skipped_steps = [int(s) for s in data.get("skipped_steps", [])]
        if any(not 0 <= s < len(norms) for s in skipped_steps):
            raise ValueError("a skipped step outside the recording")
        if any(not 0 <= s <= len(norms) for s in epoch_end_steps):
            raise ValueError("an epoch end outside the recording")
        applied = data.get("applied_norms")
        applied = None if applied is None else _rows(applied, len(keys), "applied_norms")
        updates = data.get("update_ratios")
        updates = None if updates is None else _rows(updates, len(keys), "update_ratios")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunError(f"{norms_path} is not a gradient-norm recording ({e!r})") from None
    history = {}
    history_path = os.path.join(path, "history.json")
    if os.path.exists(history_path):
        history = _read_json(history_path, "history.json")
        if not isinstance(history, dict) or not all(
                isinstance(v, list) for v in history.values()):
            raise RunError(f"{history_path} is not a Keras History (metric -> list)")
        try:  # non-finite values are stored as "nan", "inf", "-inf" (see `json_float`)
            history = {k: [float(v) for v in values] for k, values in history.items()}
        except (TypeError, ValueError) as e:
            raise RunError(f"{history_path} is not a Keras History of numbers ({e})") from None
    findings, absorbed = [], []
    diagnosis_path = os.path.join(path, "diagnosis.json")
    if os.path.exists(diagnosis_path):
        diagnosis = _read_json(diagnosis_path, "diagnosis.json")
        findings = diagnosis.get("findings", []) if isinstance(diagnosis, dict) else None
        if not isinstance(findings, list):
            raise RunError(f"{diagnosis_path} is not a report (no list of findings)")
        try:
            report = Report.from_dict(diagnosis)
        except (KeyError, TypeError) as e:
            raise RunError(f"{diagnosis_path} is not a report ({e!r})") from None
        findings = [f.to_dict() for f in report.findings]
        absorbed = report.absorbed_spikes
    from keras_gradtools.activations import ActivationRecord

    activations = ActivationRecord()
    activations_path = os.path.join(path, "activations.json")
    if os.path.exists(activations_path):
        try:
            activations = ActivationRecord.from_dict(
                _read_json(activations_path, "activations.json"))
            if len(activations.steps) != len(activations.stats):
                raise ValueError("as many probe steps as statistics")
        except (AttributeError, TypeError, ValueError) as e:
            raise RunError(f"{activations_path} is not an activation record ({e!r})") from None
    config["skipped_steps"] = skipped_steps
    return Run(path=path, keys=keys, norms=norms, epoch_end_steps=epoch_end_steps,
               skipped_steps=skipped_steps, applied_norms=applied, history=history,
               findings=findings, absorbed_spikes=absorbed, config=config,
               activations=activations, update_ratios=updates)


def outcome(run):
    """The numbers `gradtools compare` sets side by side for one run.

    Args:
        run: a `Run`.

    Returns:
        A dict: `steps`, `epochs`, `final_loss`, `final_accuracy`,
        `loss_jump` (largest epoch-over-epoch loss ratio) and its 1-based
        `loss_jump_epoch`, `max_global_norm`, `max_applied_global_norm`
        (`None` without clipping) and `findings` (their kinds, in order).

    Example:

    >>> run = Run("r", ["a"], np.array([[3.0], [4.0]]), [1, 2], [],
    ...           history={"loss": [1.0, 3.0], "accuracy": [0.5, 0.25]})
    >>> o = outcome(run)
    >>> o["loss_jump"], o["loss_jump_epoch"], o["max_global_norm"], o["final_accuracy"]
    (3.0, 2, 4.0, 0.25)
    """
    loss = [float(v) for v in run.history.get("loss", [])]
    accuracy = next((run.history[k] for k in ("accuracy", "acc", "sparse_categorical_accuracy",
                                               "categorical_accuracy") if k in run.history), [])
    jump = epoch = None
    if len(loss) > 1:
        with np.errstate(all="ignore"):
            ratios = np.asarray(loss[1:]) / np.asarray(loss[:-1])
        if np.isfinite(ratios).any():
            i = int(np.nanargmax(np.where(np.isfinite(ratios), ratios, np.nan)))
            jump, epoch = float(ratios[i]), i + 2
    applied = run.applied_global_norms
    return {
        "steps": int(len(run.norms)),
        "epochs": len(run.epoch_end_steps),
        "final_loss": loss[-1] if loss else None,
        "final_accuracy": float(accuracy[-1]) if accuracy else None,
        "loss_jump": jump,
        "loss_jump_epoch": epoch,
        "max_global_norm": _finite_max(run.global_norms),
        "max_applied_global_norm": None if applied is None else _finite_max(applied),
        "findings": [f.get("kind", "?") for f in run.findings],
    }


def _finite_max(values):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else None
