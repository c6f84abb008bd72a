"""Rules that judge recorded gradient norms: findings with evidence and fixes.

Each rule is a pure function over a block of per-step norms
`(steps, variables)`, with its state made explicit so that it can be fed
the series piece by piece while training runs (`GradientMonitor`) or whole
afterwards (`diagnose_norms`, `gradtools diagnose`), with the same result:

    findings, state = rule(rows, keys, first_step, state=state, **thresholds)

Rules and their defaults:

- `vanishing_rule`: a weight's norm below `ratio` (1e-3) of the output
  layer's (the last recorded weight), or below the absolute `floor`
  (1e-7), for `patience` (50) consecutive steps; batch-norm `gamma`/`beta`
  and biases are not judged.
- `exploding_rule`: a spike of the global norm against its own recent
  history: on the log scale, an exponential moving average (`alpha` 0.97)
  of mean and variance; a step whose z-score exceeds `zscore` (3.0) *and*
  whose norm is at least `ratio` (10) times the moving average, after
  `warmup` (100) steps, confirmed when the norm is that high again in
  `confirm` (3) of the `confirm_window` (10) steps from the spike on; or a
  global norm above the absolute `ceiling` (1e6). It names the layers that
  spiked with it (`layer_zscore`, 5.0, against their own history). When the
  optimizer clips, a spike below the ceiling is the clipping at work, not a
  finding: the report lists it among `absorbed_spikes`, as it counts the
  steps a loss-scale optimizer skipped.
- `nonfinite_rule`: any NaN or Inf norm, naming the first variable from the
  input side.
- `dead_layer_rule`: a variable whose gradient is exactly zero for
  `patience` (50) consecutive steps.

Rules over the activation probe (`keras_gradtools.activations`), fed the
probe statistics `(steps, stats)`:

- `saturation_rule`: a bounded activation (sigmoid, tanh, ...) with at least
  `fraction` (0.5) of its values in the flat tails for `patience` (3)
  consecutive probes.
- `dead_units_rule`: a ReLU layer with at least `fraction` (0.5) of its units
  at 0 for every probe sample, for `patience` (3) consecutive probes.

And over the update-to-weight ratios (`GradNormLogger(update_ratio=True)`):

- `update_ratio_rule`: a weight whose update `||dw|| / ||w||` stays outside
  [`low`, `high`] ([1e-5, 1e-1]; about 1e-3 is healthy) for `patience` (50)
  consecutive steps; normalization and bias vectors are not judged.

With probe statistics the `vanishing` finding states its cause: its
evidence gains `layer_gains` (each layer's mean local activation derivative)
and `predicted_ratio` (their product from the starving layer to the output),
and its message says whether the activations' derivative compounded over the
depth, saturation, or the weights account for the ratio observed.

Findings carry 0-based `step` (the first step the condition held, counted
from the start of `fit()`), `detected_step` (when the rule could tell), a
1-based `epoch` (as Keras prints it), the variables involved ordered input
to output, the `evidence` (the numbers and the thresholds), and `fixes`.
"""

import dataclasses
import json

import numpy as np

KINDS = ("nonfinite", "exploding", "vanishing", "dead_layer", "saturation", "dead_units",
         "update_ratio")

DEFAULTS = {
    "nonfinite": {"max_skipped": 10, "max_initial_skipped": 64},
    "vanishing": {"ratio": 1e-3, "floor": 1e-7, "patience": 50,
                  "skip": ("gamma", "beta", "bias")},
    "exploding": {"alpha": 0.97, "zscore": 3.0, "layer_zscore": 5.0, "ratio": 10.0,
                  "warmup": 100, "ceiling": 1e6, "confirm": 3, "confirm_window": 10},
    "dead_layer": {"patience": 50},
    "saturation": {"fraction": 0.5, "patience": 3},
    "dead_units": {"fraction": 0.5, "patience": 3},
    "update_ratio": {"low": 1e-5, "high": 1e-1, "patience": 50,
                     "skip": ("gamma", "beta", "bias")},
}


@dataclasses.dataclass
class Finding:
    """One problem found in the gradient norms.

    Attributes:
        kind: one of `KINDS`: `nonfinite`, `exploding`, `vanishing`,
            `dead_layer`, `saturation`, `dead_units` or `update_ratio`.
        step: the first step (0-based, from the start of `fit()`) at which
            the condition held.
        detected_step: the step at which the rule could tell.
        epoch: the 1-based epoch of `step`, or `None` if unknown.
        layers: the variables involved (`variable.path`), input to output.
        evidence: the numbers that tripped the rule, with its thresholds.
        fixes: suggested remedies, worded for a user.
        message: a one-sentence summary.
    """

    kind: str
    step: int
    detected_step: int
    layers: list
    evidence: dict
    fixes: list
    message: str
    epoch: int = None

    def to_dict(self):
        """The finding as JSON-ready data."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data):
        """The inverse of `to_dict`."""
        return cls(**data)

    def __str__(self):
        where = f"step {self.step}" + (f" (epoch {self.epoch})" if self.epoch else "")
        text = f"[{self.kind}] from {where}, detected at step {self.detected_step}: {self.message}"
        if self.fixes:
            text += "\n  What to do:\n" + "\n".join(f"  - {fix}" for fix in self.fixes)
        return text


@dataclasses.dataclass
class Report:
    """The findings of a run, first step first.

    `str(report)` is the text a person reads, one paragraph per finding;
    `report.to_dict()` / `report.to_json()` the machine-readable form.

    Attributes:
        findings: the `Finding`s, first step first. Every one is a problem.
        steps: the steps judged.
        keys: the variables' keys, input to output.
        skipped_steps: steps a loss-scale optimizer skipped (its normal
            working, not judged).
        absorbed_spikes: spikes of the global norm that the optimizer's
            clipping absorbed (its normal working, not findings): dicts with
            `step`, `detected_step`, `norm`, `recent_level`, `jump`,
            `clipping` (and `epoch` when known), first step first.
    """

    findings: list
    steps: int = 0
    keys: list = dataclasses.field(default_factory=list)
    skipped_steps: int = 0
    absorbed_spikes: list = dataclasses.field(default_factory=list)

    def kinds(self):
        """The set of kinds found."""
        return {f.kind for f in self.findings}

    def first(self, kind):
        """The first finding of `kind`, or `None`."""
        for finding in self.findings:
            if finding.kind == kind:
                return finding
        return None

    def to_dict(self):
        return {
            "steps": int(self.steps),
            "keys": list(self.keys),
            "healthy": not self.findings,
            "skipped_steps": int(self.skipped_steps),
            "absorbed_spikes": _jsonable(list(self.absorbed_spikes)),
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data):
        findings, absorbed = [], list(data.get("absorbed_spikes", []))
        for f in data.get("findings", []):
            if f.get("kind") == "clipped_spike":  # how older reports listed them
                evidence = f.get("evidence", {})
                absorbed.append({"step": f["step"], "detected_step": f["detected_step"],
                                 **{k: evidence.get(k) for k in
                                    ("norm", "recent_level", "jump", "clipping")},
                                 **({"epoch": f["epoch"]} if f.get("epoch") else {})})
            else:
                findings.append(Finding.from_dict(f))
        return cls(findings=findings, steps=data.get("steps", 0), keys=data.get("keys", []),
                   skipped_steps=data.get("skipped_steps", 0),
                   absorbed_spikes=sorted(absorbed, key=lambda a: a["step"]))

    def __str__(self):
        head = f"Gradient report over {self.steps} steps"
        if self.skipped_steps:
            head += (f" ({self.skipped_steps} skipped by the loss-scale optimizer, "
                     "not judged)")
        head += f", {len(self.keys)} variables: "
        if not self.findings:
            head += "no vanishing, exploding or non-finite gradients found."
        else:
            head += f"{len(self.findings)} problem(s) found."
        if self.absorbed_spikes:
            first = self.absorbed_spikes[0]
            where = ", ".join(str(a["step"]) for a in self.absorbed_spikes[:5])
            where += ", ..." if len(self.absorbed_spikes) > 5 else ""
            head += (f"\nThe optimizer's clipping ({first.get('clipping')}) absorbed "
                     f"{len(self.absorbed_spikes)} spike(s) of the global norm, at step(s) "
                     f"{where} (the first {_num(first.get('jump'))}x its recent level); "
                     "nothing to do while the loss keeps falling.")
        if not self.findings:
            return head
        return head + "\n\n" + "\n\n".join(str(f) for f in self.findings)


def _num(value):
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if np.isfinite(value):
            return value
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _short(key):
    """The path without the model's name: `deep/dense_3/kernel` -> `dense_3/kernel`."""
    parts = key.split("/")
    return "/".join(parts[1:]) if len(parts) >= 3 else key


def _span(layers):
    if len(layers) <= 3:
        return ", ".join(_short(k) for k in layers)
    return f"{_short(layers[0])} ... {_short(layers[-1])} ({len(layers)} variables)"


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


SATURATING = ("sigmoid", "tanh", "hard_sigmoid", "softsign")
LINEAR = ("linear", None)


@dataclasses.dataclass
class ModelFacts:
    """What a model is made of, for fixes that fit it (see `keras_gradtools.facts`).

    Attributes:
        activations: dict, the path of each layer with an activation (as in
            the recorded keys, without the variable name) -> its activation's
            name (`"sigmoid"`, `"relu"`, `"linear"`, ...), input to output.
        normalization: the paths of the normalization layers (batch, layer,
            group normalization).
        residual: whether the model adds a shortcut anywhere (an `Add`
            layer or a residual block).
        optimizer: the optimizer's class name, or `None`.
        learning_rate: its learning rate (a float), or `None` when it is a
            schedule or unknown.
    """

    activations: dict = dataclasses.field(default_factory=dict)
    normalization: list = dataclasses.field(default_factory=list)
    residual: bool = False
    optimizer: str = None
    learning_rate: float = None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """The facts saved with `to_dict` (a run's config); `None` for `None`."""
        if data is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def hidden_activations(self):
        """`{layer: activation}` without the last layer (the output's, e.g. softmax)."""
        return dict(list(self.activations.items())[:-1])


def _vanishing_fixes(layers, judged, facts, cause=None):
    """The vanishing finding's fixes, chosen from the model when its facts are known, and
    led by the cause when the probe told it (`vanishing_cause`'s evidence)."""
    shallower = (f"make the network shallower: {len(layers)} of {judged} weights are starved")
    cause = cause or {}
    if facts is None and not cause:
        return [
            "Use ReLU with He initialization instead of sigmoid/tanh "
            "(`Dense(..., activation='relu', kernel_initializer='he_normal')`; with the "
            "article's builder, `create_deep_sigmoid_model(activation='relu', "
            "kernel_initializer='he_normal')`).",
            "Add batch normalization after the hidden layers (`batch_norm=True`).",
            f"Add residual connections (`ResNetBlock`, `resnet_model`), or {shallower}.",
        ]
    fixes = []
    if cause.get("cause") == "saturation":
        saturated = cause.get("saturated_layers") or []
        fixes.append(
            f"Keep {_layers_span(saturated) if saturated else 'the saturated layers'} out of "
            "their flat tails: normalize their inputs (`keras.layers.BatchNormalization()` "
            "before the activation), scale the inputs or initial weights down, or use ReLU "
            "with He initialization there.")
    elif cause.get("cause") == "weights":
        fixes.append(
            f"Check the initialization of {_span(layers)} and the layers above them: the "
            f"activations pass on {cause['predicted_ratio']:.2g} of the gradient, the weights "
            f"bring it to {cause['observed_ratio']:.2g}. Use Keras' default Glorot or He "
            "initializers (`kernel_initializer='he_normal'` with ReLU) rather than a small "
            "fixed scale.")
    hidden = facts.hidden_activations() if facts is not None else {}
    saturating = [layer for layer, act in hidden.items() if act in SATURATING]
    # Compounding needs depth: one bounded layer among many others (a transformer's
    # tanh pooler) does not starve the layers below it by its derivative.
    if saturating and cause.get("cause") != "weights" and (
            len(saturating) >= 2 or 2 * len(saturating) >= len(hidden)):
        names = sorted({hidden[layer] for layer in saturating})
        short = [layer.rsplit("/", 1)[-1] for layer in saturating]
        where = ", ".join(short) if len(short) <= 3 else f"{short[0]} ... {short[-1]}"
        fixes.append(
            f"Replace {'/'.join(names)} in {where} ({len(saturating)} layer(s)) "
            "with ReLU and He initialization: `activation='relu', "
            "kernel_initializer='he_normal'` on each; their derivative is at most "
            f"{'0.25' if names == ['sigmoid'] else '1'} and compounds over the depth.")
    if facts is None:
        fixes.append("Add batch normalization after the hidden layers, or residual "
                     f"connections (`ResNetBlock`, `resnet_model`), or {shallower}.")
        return fixes
    if not facts.normalization:
        fixes.append("Add `keras.layers.BatchNormalization()` after each hidden layer "
                     "(before its activation): the model has no normalization layer.")
    if not facts.residual:
        fixes.append(f"Add residual connections (`ResNetBlock`, `resnet_model`), or "
                     f"{shallower}.")
    elif facts.normalization:
        fixes.append("The model has normalization and shortcuts already: check the "
                     f"initialization of the starved layers, or {shallower}.")
    else:
        fixes.append(f"The model has shortcuts already: {shallower}.")
    return fixes


def _exploding_fixes(level, facts, clipping=None):
    """The exploding finding's fixes, chosen from the model and its clipping when known."""
    if clipping:  # clipping bounds the step, not the gradient: more of it is no fix
        clip = (f"The optimizer already clips ({clipping}), which bounds the step but not the "
                "gradient: look for what made it this large (the data of that step, weights "
                "that grew under too high a learning rate).")
    elif facts is not None and facts.optimizer:
        clip = (f"Clip gradients: `{facts.optimizer}(..., clipnorm=1.0)` (per variable) or "
                f"`global_clipnorm=1.0`. Pick the threshold near the healthy level "
                f"({level:.3g} for the global norm here).")
    else:
        clip = ("Clip gradients: `keras.optimizers.Adam(learning_rate=1e-3, clipnorm=1.0)` (per "
                "variable) or `global_clipnorm=1.0`; the article's fix. Pick the threshold near "
                f"the healthy level ({level:.3g} for the global norm here).")
    if facts is None:
        return [clip, "Lower the learning rate (10x) or add warm-up.",
                "Add batch normalization or nonlinear activations: a deep stack "
                "of linear layers multiplies the gradient by every weight matrix."]
    fixes = [clip]
    if facts.learning_rate:
        fixes.append(f"Lower the learning rate from {facts.learning_rate:g} to "
                     f"{facts.learning_rate / 10:g}, or add warm-up.")
    else:
        fixes.append("Lower the learning rate (10x) or add warm-up.")
    hidden = facts.hidden_activations()
    if hidden and all(act in LINEAR for act in hidden.values()) and not facts.normalization:
        fixes.append(f"The {len(hidden)} hidden layers are linear with no normalization: a "
                     "deep stack of linear layers multiplies the gradient by every weight "
                     "matrix; add nonlinear activations (`activation='relu'`) or "
                     "`keras.layers.BatchNormalization()` between them.")
    return fixes


def nonfinite_rule(rows, keys, first_step=0, state=None, skipped=None, max_skipped=10,
                   max_initial_skipped=64):
    """Finds the first step with a NaN or Inf gradient norm.

    Steps that a loss-scale optimizer skipped (`skipped`) are its normal
    working: it halves its scale and retries. They are not judged one by
    one; but a run of more than `max_skipped` skipped steps in a row once
    some step has been applied (`max_initial_skipped` for the run that
    opens training, while the scale is being calibrated) means that the
    gradients are non-finite at any scale, and is reported.

    Args:
        rows: `(steps, len(keys))` norms.
        keys: the variables' keys, input to output.
        first_step: the step number of `rows[0]`. Defaults to `0`.
        state: the state returned by the previous call, or `None`.
        skipped: a bool per row, true for the steps that a loss-scale
            optimizer skipped (their overflow is its normal working, not a
            finding), or `None`. Defaults to `None`.
        max_skipped: the longest run of skipped steps judged normal after
            the first applied step. Defaults to `10`.
        max_initial_skipped: the same for the run that opens training.
            Defaults to `64` (from Keras' initial scale 2**15, 64 halvings
            leave a scale of 2**-49).

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> rows = np.array([[1.0, 2.0], [np.nan, np.inf]])
    >>> findings, _ = nonfinite_rule(rows, ["a/kernel", "b/kernel"])
    >>> findings[0].step, findings[0].layers
    (1, ['a/kernel', 'b/kernel'])
    """
    state = dict(state or {"fired": False})
    state.setdefault("run", 0)
    state.setdefault("applied_before", False)
    rows = np.asarray(rows, dtype=float)
    if state["fired"] or not rows.size:
        return [], state
    bad = ~np.isfinite(rows)
    if skipped is not None:
        skipped = np.asarray(skipped, bool)
        bad[skipped] = False
        storm = _skip_storm(skipped, state, max_skipped, max_initial_skipped)
        hit = np.flatnonzero(bad.any(axis=1))
        if storm is not None and (not hit.size or storm[1] < hit[0]):
            start, detected, limit, initial = storm
            state["fired"] = True
            return [Finding(
                kind="nonfinite", step=first_step + start, detected_step=first_step + detected,
                layers=list(keys),
                evidence={"skipped_in_a_row": int(detected - start + 1), "limit": int(limit),
                          "since_start_of_training": bool(initial)},
                message=(f"the loss-scale optimizer skipped every step from step "
                         f"{first_step + start} on ({detected - start + 1} in a row, above "
                         f"{limit}): halving its scale does not make the gradients finite, "
                         "so they are NaN/Inf at any scale, not an overflow."),
                fixes=[
                    "Check that the weights are still finite "
                    "(`all(np.isfinite(w).all() for w in model.get_weights())`): a "
                    "non-finite update reached them, and every later step is skipped.",
                    "Check the data and the loss for NaN/Inf "
                    "(`np.isfinite(x).all()`, labels in range).",
                    "Under tf.distribute with several replicas, Keras' LossScaleOptimizer "
                    "judges finiteness on the first replica's share only; a non-finite "
                    "share on another replica is summed into the update. Train with "
                    "`mixed_bfloat16` (no loss scaling) or on one replica.",
                ],
            )], state
    hit = np.flatnonzero(bad.any(axis=1))
    if not hit.size:
        return [], state
    i = int(hit[0])
    step = first_step + i
    layers = [k for k, b in zip(keys, bad[i]) if b]
    state["fired"] = True
    first = layers[0]
    value = rows[i, keys.index(first)]
    return [Finding(
        kind="nonfinite", step=step, detected_step=step, layers=layers,
        evidence={"first_layer": first, "value": float(value),
                  "nonfinite_layers": len(layers), "of_layers": len(keys)},
        message=(f"the gradient of {first} is {value} at step {step}"
                 + (f", and {len(layers) - 1} more variable(s) with it" if len(layers) > 1 else "")
                 + "; the optimizer is applying non-finite updates."),
        fixes=[
            "If every variable turned non-finite at once, look at the data first: a NaN "
            "or Inf in one batch does this (check `np.isfinite(x).all()` and the labels).",
            f"If it starts in {_short(first)} alone, lower the learning rate (10x), or clip "
            "gradients (`keras.optimizers.Adam(clipnorm=1.0)`).",
            "With float16, use `keras.mixed_precision.set_global_policy('mixed_float16')` "
            "so that Keras scales the loss (its loss-scale optimizer skips overflowing steps).",
        ],
    )], state


def _skip_storm(skipped, state, max_skipped, max_initial_skipped):
    """`(start, detected, limit, initial)` of the first too-long run of skips, or `None`.

    `start` may be negative: the run began in an earlier block.
    """
    for i, skip in enumerate(skipped):
        if not skip:
            state["run"] = 0
            state["applied_before"] = True
            continue
        state["run"] += 1
        limit = max_skipped if state["applied_before"] else max_initial_skipped
        if state["run"] > limit:
            return i - state["run"] + 1, i, limit, not state["applied_before"]
    return None


def starved_steps(rows, keys, ratio=1e-3, floor=1e-7, skip=("gamma", "beta", "bias")):
    """Which variables are starved at which steps, as `vanishing_rule` judges it.

    A variable is starved at a step when its norm is below `ratio` times the
    reference's (the last judged variable: the output layer) or below
    `floor`, and is finite and not exactly 0. Variables named as in `skip`
    are never starved.

    Args:
        rows: `(steps, len(keys))` norms.
        keys: the variables' keys, input to output.
        ratio: relative threshold. Defaults to `1e-3`.
        floor: absolute threshold. Defaults to `1e-7`.
        skip: variable names (last path part) that are not judged.
            Defaults to `("gamma", "beta", "bias")`.
        facts: the model's `ModelFacts`, to choose fixes that fit it, or
            `None` for generic ones. Defaults to `None`.

    Returns:
        A `(steps, len(keys))` bool array.

    Example:

    >>> starved_steps([[1e-5, 1.0], [1e-2, 1.0]], ["in/kernel", "out/kernel"]).tolist()
    [[True, False], [False, False]]
    """
    rows = np.asarray(rows, dtype=float).reshape(-1, len(keys))
    judged = np.array([k.split("/")[-1] not in skip for k in keys], bool)
    starved = np.zeros(rows.shape, bool)
    if not judged.any():
        return starved
    ref = int(np.flatnonzero(judged)[-1])
    with np.errstate(all="ignore"):
        starved = rows / rows[:, ref:ref + 1] < ratio
    starved[:, ref] = False
    starved |= rows < floor
    starved &= rows > 0
    starved &= np.isfinite(rows)
    starved &= judged
    return starved


def vanishing_rule(rows, keys, first_step=0, state=None, ratio=1e-3, floor=1e-7,
                   patience=50, skip=("gamma", "beta", "bias"), facts=None, activations=None):
    """Finds layers whose gradient is a tiny fraction of the output layer's.

    At each step a variable is "starved" when its norm is below `ratio`
    times the last variable's (the output layer, the reference) or below
    the absolute `floor`; exact zeros are left to `dead_layer_rule`. The
    rule fires when some variable has been starved for `patience`
    consecutive steps; the finding names every variable starved then.
    Vectors of normalization and bias parameters (variables named as in
    `skip`) are not judged and are never the reference: their norms are
    small by nature (a converged ResNet's last batch-norm `gamma` sits at
    3.5e-4 of its output layer's) and say nothing about the signal
    reaching the weights.

    Args:
        rows: `(steps, len(keys))` norms.
        keys: the variables' keys, input to output; the last is the
            reference.
        first_step: the step number of `rows[0]`. Defaults to `0`.
        state: the state returned by the previous call, or `None`.
        ratio: relative threshold. Defaults to `1e-3`.
        floor: absolute threshold. Defaults to `1e-7`.
        patience: consecutive steps. Defaults to `50`.
        skip: variable names (last path part) that are not judged.
            Defaults to `("gamma", "beta", "bias")`.
        facts: the model's `ModelFacts`, to choose fixes that fit it, or
            `None` for generic ones. Defaults to `None`.
        activations: the activation probes so far, `(step, {layer: stats})`
            pairs in order, or `None`: the finding then states its cause
            (see `vanishing_cause`) from the last probe at or before the
            detection step. Defaults to `None`.

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> rows = np.tile([1e-5, 1e-2, 1.0], (3, 1))
    >>> findings, _ = vanishing_rule(rows, ["in/kernel", "mid/kernel", "out/kernel"],
    ...                              patience=3)
    >>> findings[0].layers, findings[0].detected_step
    (['in/kernel'], 2)
    """
    rows = np.asarray(rows, dtype=float)
    n = len(keys)
    state = dict(state or {"run": np.zeros(n, int), "fired": False,
                           "tail": np.zeros((0, n))})
    state["run"] = np.array(state["run"], int)
    findings = []
    if n < 1 or not rows.size:
        return findings, state
    # The last `patience` rows of earlier blocks: the evidence window may
    # reach back into them.
    past = np.concatenate([np.asarray(state["tail"], float).reshape(-1, n), rows])
    offset = len(past) - len(rows)
    state["tail"] = past[-patience:]
    judged = np.array([k.split("/")[-1] not in skip for k in keys])
    if not judged.any():
        return findings, state
    ref = int(np.flatnonzero(judged)[-1])
    starved = starved_steps(rows, keys, ratio, floor, skip)
    for i in range(len(rows)):
        run = np.where(starved[i], state["run"] + 1, 0)
        state["run"] = run
        if state["fired"] or run.max() < patience:
            continue
        state["fired"] = True
        step = first_step + i
        layers = [k for k, r in zip(keys, run) if r >= patience]
        window = past[offset + i - patience + 1:offset + i + 1]
        idx = [keys.index(k) for k in layers]
        median = np.median(window[:, idx], axis=0)
        ref_norm = float(np.median(window[:, ref]))
        worst = float(np.min(median / ref_norm)) if ref_norm > 0 else float("nan")
        evidence = {
            "reference_layer": keys[ref], "reference_norm": ref_norm,
            "layer_norms": {k: float(m) for k, m in zip(layers, median)},
            "smallest_ratio": worst, "ratio_threshold": ratio,
            "floor": floor, "patience": patience,
        }
        cause = ""
        probe = _probe_at(activations, step)
        if probe is not None and ref_norm > 0:
            found, cause = vanishing_cause(layers[0], float(median[0]) / ref_norm, probe)
            evidence.update(found)
        findings.append(Finding(
            kind="vanishing", step=step - patience + 1, detected_step=step,
            layers=layers,
            evidence=evidence,
            message=(f"{_span(layers)} get(s) gradients down to {worst:.2g} times the output "
                     f"layer's ({_short(keys[ref])}: {ref_norm:.3g}), below {ratio:g} for "
                     f"{patience} steps: the early layers barely learn."
                     + (f" {cause}" if cause else "")),
            fixes=_vanishing_fixes(layers, int(judged.sum()), facts,
                                   evidence if "cause" in evidence else None),
        ))
    return findings, state


def exploding_rule(rows, keys, first_step=0, state=None, alpha=0.97, zscore=3.0,
                   ratio=10.0, warmup=100, ceiling=1e6, clipping=None, layer_zscore=5.0,
                   facts=None, confirm=3, confirm_window=10):
    """Finds spikes of the global norm against its recent history, and the layers behind them.

    The global norm and each variable's norm are followed on the log scale
    by an exponential moving average of mean and variance (weight `alpha`
    on the past, as ZClip does on the raw scale). The global norm spikes
    when, after `warmup` steps, its log norm is more than `zscore`
    deviations above the mean *and* it is at least `ratio` times its average
    level, or when it exceeds `ceiling`. The finding names the layers that
    spiked against their own history at that step (`layer_zscore`, since
    dozens of layers are tested at once), else those that grew `ratio`-fold,
    else the three that grew most.

    The verdict weighs harm, not one layer's surprise. A spike must last:
    the global norm must be at least `ratio` times the level it jumped from
    again (or non-finite) in `confirm` of the `confirm_window` steps from
    the spike on (the spike included), and the finding is told at the step
    that confirms it (`detected_step`; `step` is the spike's); a norm above
    `ceiling` needs no confirmation. A one-step spike that is gone the next
    step (seen in batch-normalized networks, whose loss does not move) is not
    reported. And a layer whose own norm jumps while the global norm stays
    within `ratio` of its level did not move the step the optimizer takes,
    and is not reported either. (A
    convolution followed by batch normalization is the common case: its
    output does not depend on the kernel's scale, so the kernel's gradient
    norm swings by orders of magnitude in healthy training.) Non-finite
    steps are left to `nonfinite_rule` and exact zeros to
    `dead_layer_rule`: neither enters the averages (a series starts at its
    first positive norm), so a recovery from zeros is not a spike.

    If `clipping` describes the optimizer's clipping (e.g. `"clipnorm=1.0"`),
    a spike below `ceiling`, confirmed as above, is the clipping at work: it
    bounds the step the optimizer takes. Such a spike is no finding; it is
    kept in `state["absorbed"]` (a dict per spike: `step`, `detected_step`,
    `norm`, `recent_level`, `jump`, `clipping`; `Diagnoser` reports them as
    `Report.absorbed_spikes`), and the rule goes on watching once the global
    norm is back below `ratio` times the level it jumped from. A global norm
    above `ceiling` is `exploding` with or without clipping: the clipping
    bounds the step, not the model that produced a gradient that large.

    Args:
        rows: `(steps, len(keys))` norms.
        keys: the variables' keys, input to output.
        first_step: the step number of `rows[0]`. Defaults to `0`.
        state: the state returned by the previous call, or `None`.
        alpha: EMA weight of the past. Defaults to `0.97`.
        zscore: z-score threshold on the log scale. Defaults to `3.0`.
        ratio: minimum jump over the average level. Defaults to `10.0`.
        warmup: steps before spikes are judged. Defaults to `100`.
        ceiling: absolute ceiling on any norm. Defaults to `1e6`.
        clipping: a description of the optimizer's clipping, or `None`.
            Defaults to `None`.
        layer_zscore: z-score threshold for a single layer's series.
            Defaults to `5.0`.
        facts: the model's `ModelFacts`, to choose fixes that fit it, or
            `None` for generic ones. Defaults to `None`.
        confirm: steps at least `ratio` times the pre-spike level (the
            spike's own included) that confirm a spike. Defaults to `3`.
        confirm_window: the steps, from the spike on, in which they must
            fall. Defaults to `10`.

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> rows = np.concatenate([np.full((200, 1), 1.0), [[500.0]] * 5])
    >>> rows[::2] *= 1.1  # a little noise
    >>> findings, _ = exploding_rule(rows, ["w/kernel"])
    >>> findings[0].step, findings[0].detected_step
    (200, 202)
    >>> rows[201:] = 1.0  # gone the next step: a transient, no finding
    >>> exploding_rule(rows, ["w/kernel"])[0]
    []
    """
    rows = np.asarray(rows, dtype=float)
    n = len(keys)
    if state is None:
        state = {"mean": None, "var": np.zeros(n + 1), "fired": False}
    else:
        state = dict(state)
    findings = []
    if not rows.size:
        return findings, state
    with np.errstate(all="ignore"):
        series = np.concatenate(
            [np.sqrt(np.sum(np.square(rows), axis=1, keepdims=True)), rows], axis=1
        )
        logs = np.log(np.maximum(series, 1e-38))
    mean = (np.full(n + 1, np.nan) if state["mean"] is None
            else np.array(state["mean"], float))
    var = np.array(state["var"], float)
    counts = np.array(state.get("counts", np.zeros(n + 1, int)))
    pending = state.get("pending")
    episode = state.get("episode")  # the pre-spike level of the last absorbed spike
    absorbed = list(state.get("absorbed", []))
    for i in range(len(rows)):
        x, lx = series[i], logs[i]
        finite = np.isfinite(x)
        if pending is not None and not state["fired"]:
            # A spike waits for its confirmation: the global norm again at least
            # `ratio` times the level it jumped from (or non-finite) in `confirm`
            # of the `confirm_window` steps from the spike on.
            pending["waited"] += 1
            if not finite[0] or x[0] >= ratio * pending["level"]:
                pending["seen"] += 1
            if pending["seen"] >= confirm and pending.get("absorbed"):
                absorbed.append(dict(pending["absorbed"], detected_step=first_step + i))
                episode, pending = pending["level"], None
            elif pending["seen"] >= confirm:
                state["fired"] = True
                finding = pending["finding"]
                finding.detected_step = first_step + i
                finding.evidence["confirmed_in"] = [pending["seen"] - 1, pending["waited"]]
                again = (f", and was at least {ratio:g}x that level again in "
                         f"{pending['seen'] - 1} of the next {pending['waited']} steps")
                head, sep, tail = finding.message.partition("; ")
                finding.message = head + again + sep + tail
                findings.append(finding)
                pending = None
            elif pending["waited"] >= confirm_window - 1:
                pending = None  # a transient spike: no harm done
        if not finite.all():
            continue  # nonfinite_rule's business
        if episode is not None and x[0] < ratio * episode:
            episode = None  # the absorbed spike is over
        # Exact zeros (a layer, or everything, that got no gradient: see
        # dead_layer_rule) say nothing about the level and stay out of the
        # averages; a series starts at its first positive norm.
        positive = x > 0
        fresh = positive & np.isnan(mean)
        mean = np.where(fresh, lx, mean)
        counts = counts + fresh
        valid = positive & ~fresh
        std = np.sqrt(var)
        with np.errstate(all="ignore"):
            z = np.where(valid, (lx - mean) / np.maximum(std, 1e-12), 0.0)
            level = np.exp(mean)
            jump = np.where(valid, x / level, 0.0)
        bar = np.full(n + 1, layer_zscore)
        bar[0] = zscore
        against_history = valid & (counts >= warmup) & (z > bar) & (jump >= ratio)
        spiking = against_history | (x > ceiling)
        above = x[0] > ceiling
        quiet = pending is not None or episode is not None
        if not state["fired"] and spiking[0] and (not quiet or (clipping and above)):
            step = first_step + i
            if clipping and not above:  # the clipping's business: absorbed once confirmed
                spike = {"step": step, "norm": float(x[0]), "recent_level": float(level[0]),
                         "jump": float(jump[0]), "clipping": clipping}
                if confirm <= 1:
                    absorbed.append(dict(spike, detected_step=step))
                    episode = float(level[0])
                else:
                    pending = {"level": float(level[0]), "seen": 1, "waited": 0,
                               "absorbed": spike}
            else:
                layers = [k for k, s in zip(keys, spiking[1:]) if s]
                if not layers:  # no layer beat its own bar: name the layers that grew
                    grew = [k for k, jmp in zip(keys, jump[1:]) if jmp >= ratio]
                    order = np.argsort(-jump[1:])[:3]
                    layers = grew or [keys[j] for j in sorted(order)]
                which, j = "global norm", 0
                by_ceiling = not against_history[j]
                evidence = {
                    "series": "global",
                    "norm": float(x[j]), "recent_level": float(level[j]),
                    "jump": float(jump[j]), "zscore": float(z[j]),
                    "zscore_threshold": float(bar[j]), "ratio_threshold": ratio,
                    "ceiling": ceiling, "alpha": alpha, "warmup": warmup,
                    "global_norm": float(x[0]),
                    "layer_jumps": {k: float(jump[1 + keys.index(k)]) for k in layers},
                }
                if clipping:
                    evidence["clipping"] = clipping
                reason = (f"above the ceiling {ceiling:g}" if by_ceiling else
                          f"{jump[j]:.3g} times its recent level {level[j]:.3g} (z = {z[j]:.1f})")
                clipped = (f"; the optimizer clips ({clipping}), but a gradient this large means "
                           "the model itself is blowing up" if clipping else "")
                found = Finding(
                    kind="exploding", step=step, detected_step=step, layers=layers,
                    evidence=evidence,
                    message=(f"the {which} jumped to {x[j]:.3g}, {reason}; "
                             f"{len(layers)} variable(s) grew with it ({_span(layers)}){clipped}."),
                    fixes=_exploding_fixes(level[0], facts, clipping),
                )
                if above or confirm <= 1:  # above the ceiling: harm enough
                    state["fired"] = True
                    findings.append(found)
                    pending = None
                else:
                    pending = {"level": float(level[0]), "seen": 1, "waited": 0,
                               "finding": found}
        # Update the averages with this step (spikes included, as ZClip).
        d = np.where(valid, lx - mean, 0.0)
        mean = mean + (1 - alpha) * d
        var = np.where(valid, alpha * (var + (1 - alpha) * d * d), var)
        counts = counts + valid
    state["mean"], state["var"], state["counts"] = mean, var, counts
    state["pending"], state["episode"], state["absorbed"] = pending, episode, absorbed
    return findings, state


def dead_layer_rule(rows, keys, first_step=0, state=None, patience=50):
    """Finds variables whose gradient is exactly zero for `patience` steps.

    A variable the loss does not reach, a layer behind dead ReLUs, or one
    cut off by a stop-gradient gets exactly zero: nothing it holds will ever
    change.

    Args:
        rows: `(steps, len(keys))` norms.
        keys: the variables' keys, input to output.
        first_step: the step number of `rows[0]`. Defaults to `0`.
        state: the state returned by the previous call, or `None`.
        patience: consecutive steps. Defaults to `50`.

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> rows = np.array([[0.0, 1.0]] * 4)
    >>> findings, _ = dead_layer_rule(rows, ["a/kernel", "b/kernel"], patience=4)
    >>> findings[0].layers
    ['a/kernel']
    """
    rows = np.asarray(rows, dtype=float)
    n = len(keys)
    state = dict(state or {"run": np.zeros(n, int), "fired": False})
    state["run"] = np.array(state["run"], int)
    findings = []
    for i in range(len(rows)):
        run = np.where(rows[i] == 0.0, state["run"] + 1, 0)
        state["run"] = run
        if state["fired"] or run.max() < patience:
            continue
        state["fired"] = True
        step = first_step + i
        layers = [k for k, r in zip(keys, run) if r >= patience]
        findings.append(Finding(
            kind="dead_layer", step=step - patience + 1, detected_step=step, layers=layers,
            evidence={"zero_steps": patience, "patience": patience},
            message=(f"{_span(layers)} got an exactly zero gradient for {patience} "
                     "consecutive steps: it does not learn at all."),
            fixes=_dead_fixes(len(layers) == len(keys)),
        ))
    return findings, state


def _dead_fixes(everything):
    if everything:  # every variable at once: nothing reaches the loss any more
        return [
            "Every gradient is exactly zero. If a ReLU layer's units all output 0 (a "
            "`dead_units` finding, with `probe_data`), nothing flows back through it: use "
            "LeakyReLU or GELU, He initialization, no negative bias, a lower learning rate.",
            "Otherwise the output has saturated. A softmax (or "
            "sigmoid) output with a probability loss clips the probabilities at 1e-7 on "
            "the JAX and PyTorch backends (TensorFlow recovers the logits), and then no "
            "gradient flows back: output logits (`activation=None`) with "
            "`from_logits=True` in the loss keep it flowing; then find what blew the "
            "outputs up (an exploding finding before this one, a learning rate too high).",
            "Check the data for a constant or empty batch stream.",
        ]
    return [
        "Check that the layer is connected to the loss (Keras warns 'Gradients do "
        "not exist for variables').",
        "If it sits behind ReLUs that output only zeros (dead ReLUs), use LeakyReLU "
        "or GELU, He initialization, or a lower learning rate.",
    ]


def _layer_of(key):
    """The layer path of a variable key: `m/dense_3/kernel` -> `m/dense_3`."""
    return key.rsplit("/", 1)[0]


def _short_layer(path):
    return path.split("/", 1)[1] if "/" in path else path


def _layers_span(names):
    short = [_short_layer(n) for n in names]
    return ", ".join(short) if len(short) <= 3 else f"{short[0]} ... {short[-1]} ({len(short)} layers)"


def _probe_at(entries, step):
    """The statistics of the last probe at or before `step`, or `None`."""
    found = None
    for probe_step, stats in entries or ():
        if probe_step > step:
            break
        found = stats
    return found


def vanishing_cause(layer_key, observed_ratio, stats):
    """Why a layer starves, from one probe's statistics: evidence fields and a sentence.

    The gradient reaching `layer_key`'s weights has passed through the local
    derivative of every activation from that layer to the output; their
    product (`predicted_ratio`) is what the activations alone make of the
    gradient. With half the units of a layer on the way saturated,
    saturation is the cause; else, within 10x of the observed ratio or
    below it, that compounding is; else (the activations pass on more than
    10x what is observed) the weights (their scale) account for the rest.

    Args:
        layer_key: the starving variable's key (`m/dense_0/kernel`).
        observed_ratio: its gradient norm over the output layer's.
        stats: `{layer_path: layer_stats}` of one probe (see
            `keras_gradtools.activations.layer_stats`), input to output.

    Returns:
        `(evidence, sentence)`; `({}, "")` when the probe does not watch the
        starving layer or a gain on the way is unknown.

    Example:

    >>> stats = {f"m/d{i}": {"activation": "sigmoid", "gain": 0.25, "saturated": 0.0}
    ...          for i in range(3)}
    >>> evidence, sentence = vanishing_cause("m/d0/kernel", 0.02, stats)
    >>> evidence["predicted_ratio"], evidence["cause"]
    (0.015625, 'compounding')
    """
    names = list(stats)
    start = _layer_of(layer_key)
    if start not in names:
        return {}, ""
    path = names[names.index(start):]
    gains = {n: stats[n].get("gain") for n in path}
    if any(g is None or not np.isfinite(g) for g in gains.values()):
        return {}, ""
    predicted = float(np.prod(list(gains.values())))
    saturated = {n: stats[n]["saturated"] for n in path
                 if stats[n].get("saturated") is not None and stats[n]["saturated"] >= 0.5}
    activations = sorted({stats[n].get("activation") for n in path} - {None})
    evidence = {"layer_gains": {n: float(g) for n, g in gains.items()},
                "predicted_ratio": predicted, "observed_ratio": float(observed_ratio)}
    mean_gain = predicted ** (1.0 / len(path)) if predicted > 0 else 0.0
    within = (predicted > 0 and observed_ratio > 0
              and abs(np.log10(predicted / observed_ratio)) <= 1.0)
    if saturated:
        evidence["cause"] = "saturation"
        evidence["saturated_layers"] = list(saturated)
        sentence = (f"Cause: saturation: {_layers_span(list(saturated))} have "
                    f"{max(saturated.values()):.0%} of their {'/'.join(activations)} outputs "
                    "in the flat tails, where the derivative is ~0.")
    elif within or predicted < observed_ratio:
        # Within 10x, or smaller still: the activations alone starve it at least as much
        # as observed (the weights pass on more than they take).
        evidence["cause"] = "compounding"
        sentence = (f"Cause: the activations' derivative compounded over depth, not "
                    f"saturation: the {len(path)} {'/'.join(activations)} layer(s) from "
                    f"{_short_layer(start)} to the output pass on {mean_gain:.3g} of the gradient "
                    f"each on average (mean local derivative), {predicted:.2g} in all, against "
                    f"{observed_ratio:.2g} observed.")
    else:
        evidence["cause"] = "weights"
        sentence = (f"The activations' derivatives account for {predicted:.2g} of the "
                    f"observed {observed_ratio:.2g}; the rest comes from the weights (their "
                    "scale or initialization).")
    return evidence, sentence


def _probe_rule(kind, field, entries, state, fraction, patience, message, fixes, harm):
    """A rule over probe statistics: `field` >= `fraction` for `patience` probes in a row.

    It fires only once the gradients show harm: `harm` is the step at which a
    gradient finding (`GRADIENT_HARM`) was told, or `None` for none yet.
    """
    state = dict(state or {"run": {}, "since": {}, "fired": False})
    run, since = dict(state["run"]), dict(state.get("since", {}))
    findings = []
    for step, stats in entries:
        hit = []
        for layer, entry in stats.items():
            value = entry.get(field)
            if value is not None and np.isfinite(value) and value >= fraction:
                run[layer] = run.get(layer, 0) + 1
                if run[layer] == 1:
                    since[layer] = int(step)
            else:
                run[layer] = 0
            if run[layer] >= patience:
                hit.append(layer)
        if hit and not state["fired"] and harm is not None and harm <= step:
            state["fired"] = True
            values = {layer: float(stats[layer][field]) for layer in hit}
            findings.append(Finding(
                kind=kind, step=min(since[layer] for layer in hit), detected_step=int(step),
                layers=hit,
                evidence={field: values, "fraction_threshold": fraction,
                          "patience_probes": patience,
                          "means": {layer: float(stats[layer]["mean"]) for layer in hit},
                          "stds": {layer: float(stats[layer]["std"]) for layer in hit}},
                message=message(hit, values, stats), fixes=fixes(hit, stats)))
    state["run"], state["since"] = run, since
    return findings, state


def saturation_rule(entries, state=None, fraction=0.5, patience=3, harm=0):
    """Finds bounded activations stuck in their flat tails, once the gradients suffer.

    A layer is saturated at a probe when at least `fraction` of its output
    values are in the tails (see `keras_gradtools.activations`); the rule
    fires when that holds for `patience` consecutive probes and the
    gradients show harm (`harm`): saturated units are a cause, reported
    with the gradient finding they explain, not on their own.

    Args:
        entries: `(step, {layer: stats})` pairs, one per probe, in order.
        state: the state returned by the previous call, or `None`.
        fraction: the saturated fraction that counts. Defaults to `0.5`.
        patience: consecutive probes. Defaults to `3`.
        harm: the step at which a gradient finding (vanishing, dead layer,
            non-finite, exploding) was told, or `None` for none yet.
            Defaults to `0` (judge the activations alone).

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> entries = [(s, {"m/d0": {"activation": "sigmoid", "mean": 0.02, "std": 0.01,
    ...                          "saturated": 0.9}}) for s in (0, 100, 200)]
    >>> (finding,), _ = saturation_rule(entries)
    >>> finding.kind, finding.step, finding.detected_step, finding.layers
    ('saturation', 0, 200, ['m/d0'])
    """
    def message(hit, values, stats):
        layer = hit[0]
        return (f"{_layers_span(hit)}: {values[layer]:.0%} of the {stats[layer]['activation']} "
                f"outputs sit in the flat tails (mean {stats[layer]['mean']:.3g}, std "
                f"{stats[layer]['std']:.3g}) for {patience} probes: their derivative is ~0 "
                "and the gradient stops there.")

    def fixes(hit, stats):
        return [f"Replace {stats[hit[0]]['activation']} in {_layers_span(hit)} with ReLU and He "
                "initialization (`activation='relu', kernel_initializer='he_normal'`).",
                "Add `keras.layers.BatchNormalization()` before the activation to keep "
                "its input centred, or lower the learning rate."]

    return _probe_rule("saturation", "saturated", entries, state, fraction, patience,
                       message, fixes, harm)


def dead_units_rule(entries, state=None, fraction=0.5, patience=3, harm=0):
    """Finds ReLU layers whose units have died (0 for every probe sample), once it harms.

    Many units of a ReLU layer may be silent on a probe batch in a healthy
    network (MobileNetV3's squeeze-and-excite gates: 50-97 % while it
    learns MNIST to a loss of 0.17), so dead units are reported as the
    cause of a gradient finding (`harm`), not on their own.

    Args:
        entries: `(step, {layer: stats})` pairs, one per probe, in order.
        state: the state returned by the previous call, or `None`.
        fraction: the fraction of dead units that counts. Defaults to `0.5`.
        patience: consecutive probes. Defaults to `3`.
        harm: the step at which a gradient finding (vanishing, dead layer,
            non-finite, exploding) was told, or `None` for none yet.
            Defaults to `0` (judge the activations alone).

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> entries = [(s, {"m/d0": {"activation": "relu", "mean": 0.0, "std": 0.0,
    ...                          "dead": 1.0}}) for s in (0, 100, 200)]
    >>> (finding,), _ = dead_units_rule(entries)
    >>> finding.kind, finding.evidence["dead"]
    ('dead_units', {'m/d0': 1.0})
    """
    def message(hit, values, stats):
        layer = hit[0]
        return (f"{_layers_span(hit)}: {values[layer]:.0%} of the ReLU units output 0 for "
                f"every probe sample, {patience} probes in a row: a dead unit gets no "
                "gradient and never recovers.")

    def fixes(hit, stats):
        return [f"Use `activation='leaky_relu'` or `'gelu'` in {_layers_span(hit)} (their "
                "gradient is not 0 below zero), with He initialization.",
                "Lower the learning rate (10x): one large update can push the biases of "
                "many units negative for good.",
                "Check the bias initialization (a negative constant kills units from the "
                "start) and add `keras.layers.BatchNormalization()` before the ReLU."]

    return _probe_rule("dead_units", "dead", entries, state, fraction, patience,
                       message, fixes, harm)


def update_ratio_rule(rows, keys, first_step=0, state=None, low=1e-5, high=1e-1,
                      patience=50, skip=("gamma", "beta", "bias"), facts=None):
    """Finds weights whose updates are far too large or too small for their size.

    `rows` are update-to-weight ratios `||w_after - w_before|| / ||w_before||`
    per step (`GradNormLogger(update_ratio=True)`); about 1e-3 is healthy
    (CS231n). The rule fires when a weight's ratio stays above `high` (the
    step rewrites the weight: learning rate too high) or below `low` (it
    barely moves) for `patience` consecutive steps. Zeros (skipped steps,
    frozen) and non-finite values are not judged and break no run.

    Args:
        rows: `(steps, len(keys))` ratios.
        keys: the variables' keys, input to output.
        first_step: the step number of `rows[0]`. Defaults to `0`.
        state: the state returned by the previous call, or `None`.
        low: the lowest healthy ratio. Defaults to `1e-5`.
        high: the highest healthy ratio. Defaults to `1e-1`.
        patience: consecutive steps. Defaults to `50`.
        skip: variable names (last path part) that are not judged.
            Defaults to `("gamma", "beta", "bias")`.
        facts: the model's `ModelFacts`, or `None`. Defaults to `None`.

    Returns:
        `(findings, state)`; at most one finding per run.

    Example:

    >>> rows = np.tile([0.5, 1e-3], (50, 1))
    >>> (finding,), _ = update_ratio_rule(rows, ["m/a/kernel", "m/b/kernel"])
    >>> finding.layers, finding.evidence["direction"]
    (['m/a/kernel'], 'high')
    """
    rows = np.asarray(rows, dtype=float).reshape(-1, len(keys))
    n = len(keys)
    state = dict(state or {"high": np.zeros(n, int), "low": np.zeros(n, int), "fired": False})
    judged = np.array([k.split("/")[-1] not in skip for k in keys], bool)
    findings = []
    runs = {d: np.array(state[d], int) for d in ("high", "low")}
    for i, row in enumerate(rows):
        seen = np.isfinite(row) & (row > 0) & judged
        runs["high"] = np.where(seen, np.where(row > high, runs["high"] + 1, 0), runs["high"])
        runs["low"] = np.where(seen, np.where(row < low, runs["low"] + 1, 0), runs["low"])
        if state["fired"]:
            continue
        for direction in ("high", "low"):
            hit = runs[direction] >= patience
            if not hit.any():
                continue
            state["fired"] = True
            layers = [k for k, h in zip(keys, hit) if h]
            median = {k: float(np.median(rows[max(0, i - patience + 1):i + 1, keys.index(k)]))
                      for k in layers}
            worst = max(median.values()) if direction == "high" else min(median.values())
            step = first_step + i
            lr = facts.learning_rate if facts is not None else None
            if direction == "high":
                message = (f"{_span(layers)}: each update changes the weight by {worst:.2g} of "
                           f"its norm (above {high:g}) for {patience} steps: the step is too "
                           "large for the weights, training is unstable or diverging.")
                fixes = [(f"Lower the learning rate from {lr:g} to {lr / 10:g} (or 100x if "
                          "the ratio is above 1)." if lr else
                          "Lower the learning rate (10x; 100x if the ratio is above 1).") ,
                         "Add learning-rate warm-up, or clip gradients "
                         "(`global_clipnorm=1.0`)."]
            else:
                message = (f"{_span(layers)}: each update changes the weight by only "
                           f"{worst:.2g} of its norm (below {low:g}) for {patience} steps: "
                           "these weights barely learn.")
                adaptive = facts is not None and facts.optimizer and any(
                    name in facts.optimizer for name in ("Adam", "RMSprop", "Adagrad",
                                                         "Adadelta", "Adafactor", "Nadam",
                                                         "Lion", "Lamb"))
                if adaptive:
                    fixes = ["An adaptive optimizer steps by about the learning rate per "
                             "weight unless the gradient falls below its `epsilon` (1e-7 by "
                             "default): so small an update means the gradient itself has "
                             "vanished here. Fix that first (see a `vanishing` finding).",
                             (f"If the gradients are healthy, raise the learning rate from "
                              f"{lr:g} (10x)." if lr else "If the gradients are healthy, "
                              "raise the learning rate (10x).")]
                else:
                    fixes = [(f"Raise the learning rate from {lr:g} (10x)." if lr else
                              "Raise the learning rate (10x)."),
                             "Try Adam: it scales each step to the gradient's recent size, "
                             "so small gradients still move the weights."]
            findings.append(Finding(
                kind="update_ratio", step=step - patience + 1, detected_step=step,
                layers=layers,
                evidence={"direction": direction, "median_ratios": median, "low": low,
                          "high": high, "patience": patience},
                message=message, fixes=fixes))
            break
    state["high"], state["low"] = runs["high"], runs["low"]
    return findings, state


RULES = {
    "nonfinite": nonfinite_rule,
    "exploding": exploding_rule,
    "vanishing": vanishing_rule,
    "dead_layer": dead_layer_rule,
}
PROBE_RULES = {"saturation": saturation_rule, "dead_units": dead_units_rule}
# The gradient findings that make the activation rules report (see `_probe_rule`).
GRADIENT_HARM = ("vanishing", "dead_layer", "nonfinite", "exploding")
UPDATE_RULES = {"update_ratio": update_ratio_rule}
ALL_RULES = {**RULES, **PROBE_RULES, **UPDATE_RULES}


def epoch_of_step(step, epoch_end_steps):
    """The 1-based epoch of a 0-based step, from the epochs' end steps.

    Example:

    >>> epoch_of_step(5, [5, 10]), epoch_of_step(4, [5, 10]), epoch_of_step(12, [5, 10])
    (2, 1, 3)
    """
    return int(np.searchsorted(np.asarray(epoch_end_steps), step, side="right")) + 1


class Diagnoser:
    """Runs every rule over norms fed block by block; see `diagnose_norms`.

    Args:
        keys: the variables' keys, input to output.
        thresholds: per-rule keyword overrides, e.g.
            `{"vanishing": {"ratio": 1e-4}}`. Defaults to `None`.
        clipping: the optimizer's clipping, or `None`. Defaults to `None`.
        rules: the rule names to run. Defaults to all of `ALL_RULES`.
        facts: the model's `ModelFacts` (fixes that fit it), or `None`.
            Defaults to `None`.
    """

    def __init__(self, keys, thresholds=None, clipping=None, rules=None, facts=None):
        self.keys = list(keys)
        self.thresholds = {k: dict(v) for k, v in DEFAULTS.items()}
        for rule, values in (thresholds or {}).items():
            if rule not in ALL_RULES:
                raise ValueError(
                    f"Unknown rule in `thresholds`; the rules are {', '.join(ALL_RULES)}. "
                    f"Received: thresholds={thresholds!r}"
                )
            self.thresholds.setdefault(rule, {}).update(values)
        self.clipping = clipping
        self.facts = facts
        self.rules = list(rules or ALL_RULES)
        self.states = {name: None for name in self.rules}
        self.steps = 0
        self.skipped_steps = 0
        self.findings = []
        self.activations = []  # (step, stats) of every probe judged
        self._queued = []  # probes waiting for the norms of the steps before them

    def _found(self, new):
        new.sort(key=lambda f: (f.step, KINDS.index(f.kind)))
        self.findings.extend(new)
        return new

    def _harm(self):
        """The detection step of the first gradient finding (`GRADIENT_HARM`), or `None`."""
        steps = [f.detected_step for f in self.findings if f.kind in GRADIENT_HARM]
        return min(steps) if steps else None

    def _judge_probes(self, upto):
        """Judges the queued probes taken at steps <= `upto` (every norm before them fed)."""
        ready = [p for p in self._queued if p[0] <= upto]
        self._queued = [p for p in self._queued if p[0] > upto]
        new = []
        for entry in ready:
            self.activations.append(entry)
            for name in self.rules:
                if name in PROBE_RULES:
                    found, self.states[name] = PROBE_RULES[name](
                        [entry], state=self.states[name], harm=self._harm(),
                        **self.thresholds.get(name, {}))
                    new.extend(found)
        return self._found(new)

    def feed_activations(self, entries):
        """Queues activation probes, `(step, {layer: stats})` pairs, to be judged in order.

        Feed a probe taken before step `s` before the norms of step `s`
        (`GradientMonitor` does): it is then judged right after the norms of
        every step before `s`, however the norms are split into blocks, so
        that the findings do not depend on the split. The `vanishing` finding
        states its cause from the last probe at or before its detection; the
        activation rules report once a gradient finding shows harm.

        Returns:
            The new findings (of the probes that could be judged now).
        """
        self._queued.extend((int(step), stats) for step, stats in entries)
        self._queued.sort(key=lambda p: p[0])
        return self._judge_probes(self.steps)

    def feed_updates(self, first_step, rows, skipped=None):
        """Judges the next block of update-to-weight ratios; returns the new findings."""
        rows = np.asarray(rows, dtype=float).reshape(-1, len(self.keys))
        if skipped is not None and np.asarray(skipped, bool).any():
            rows = rows.copy()
            rows[np.asarray(skipped, bool).reshape(len(rows))] = np.nan
        new = []
        for name in self.rules:
            if name in UPDATE_RULES:
                found, self.states[name] = UPDATE_RULES[name](
                    rows, self.keys, first_step, state=self.states[name], facts=self.facts,
                    **self.thresholds.get(name, {}))
                new.extend(found)
        return self._found(new)

    def feed(self, first_step, rows, skipped=None):
        """Judges the next block of norms; returns the new findings.

        `skipped` (a bool per row, or `None`) marks the steps a loss-scale
        optimizer skipped: no rule judges them (their norms count as missing).
        Queued activation probes are judged in between, at their steps.
        """
        rows = np.asarray(rows, dtype=float)
        skipped = None if skipped is None else np.asarray(skipped, bool).reshape(len(rows))
        new, start = [], 0
        new += self._judge_probes(first_step)
        for step, _ in list(self._queued):
            cut = step - first_step
            if not start < cut < len(rows):
                continue
            new += self._feed_norms(first_step + start, rows[start:cut],
                                    None if skipped is None else skipped[start:cut])
            new += self._judge_probes(step)
            start = cut
        new += self._feed_norms(first_step + start, rows[start:],
                                None if skipped is None else skipped[start:])
        new += self._judge_probes(self.steps)
        return new

    def _feed_norms(self, first_step, rows, skipped):
        new = []
        if skipped is not None:
            skipped = np.asarray(skipped, bool).reshape(len(rows))
            if skipped.any():
                self.skipped_steps += int(skipped.sum())
                rows = rows.copy()
                rows[skipped] = np.nan
        for name in self.rules:
            if name not in RULES:
                continue
            kwargs = dict(self.thresholds.get(name, {}))
            if name == "nonfinite":
                kwargs["skipped"] = skipped
            if name == "exploding":
                kwargs["clipping"] = self.clipping
            if name in ("exploding", "vanishing"):
                kwargs["facts"] = self.facts
            if name == "vanishing":
                kwargs["activations"] = self.activations
            found, self.states[name] = RULES[name](
                rows, self.keys, first_step, state=self.states[name], **kwargs
            )
            new.extend(found)
        self.steps = max(self.steps, first_step + len(rows))
        return self._found(new)

    def report(self, epoch_end_steps=None):
        """The findings so far as a `Report`, epochs filled in when known."""
        findings = sorted(self.findings, key=lambda f: (f.step, KINDS.index(f.kind)))
        if epoch_end_steps is not None:
            for f in findings:
                f.epoch = epoch_of_step(f.step, epoch_end_steps)
        absorbed = [dict(a) for a in (self.states.get("exploding") or {}).get("absorbed", [])]
        if epoch_end_steps is not None:
            for a in absorbed:
                a["epoch"] = epoch_of_step(a["step"], epoch_end_steps)
        return Report(findings=findings, steps=self.steps, keys=self.keys,
                      skipped_steps=self.skipped_steps, absorbed_spikes=absorbed)


def diagnose_norms(norms, keys, epoch_end_steps=None, thresholds=None, clipping=None,
                   skipped_steps=None, facts=None, activations=None, update_ratios=None):
    """Judges a whole recorded series at once.

    Gives the same findings as `GradientMonitor` does while training, block
    by block.

    Args:
        norms: `(steps, len(keys))` per-step norms.
        keys: the variables' keys, input to output.
        epoch_end_steps: steps done at each epoch's end, or `None`.
            Defaults to `None`.
        thresholds: per-rule keyword overrides. Defaults to `None`.
        clipping: the optimizer's clipping, or `None`. Defaults to `None`.
        skipped_steps: the steps a loss-scale optimizer skipped
            (`GradNormLogger.skipped_steps`), not judged. Defaults to `None`.
        facts: the model's `ModelFacts` (fixes that fit it), or `None`.
            Defaults to `None`.
        activations: the activation probes (`GradNormLogger.activations`,
            an `ActivationRecord`, or `(step, stats)` pairs), or `None`.
            Defaults to `None`.
        update_ratios: `(steps, len(keys))` update-to-weight ratios, or
            `None`. Defaults to `None`.

    Returns:
        A `Report`.

    Example:

    >>> norms = np.tile([1e-9, 1e-3, 1.0], (60, 1))
    >>> report = diagnose_norms(norms, ["a/kernel", "b/kernel", "c/kernel"])
    >>> [f.kind for f in report.findings], report.findings[0].layers
    (['vanishing'], ['a/kernel'])
    """
    diagnoser = Diagnoser(keys, thresholds=thresholds, clipping=clipping, facts=facts)
    norms = np.asarray(norms, dtype=float).reshape(-1, len(keys))
    skipped = None
    if skipped_steps is not None and len(skipped_steps):
        skipped = np.zeros(len(norms), bool)
        skipped[np.asarray(skipped_steps, int)] = True
    if activations is not None:
        if hasattr(activations, "steps"):
            activations = list(zip(activations.steps, activations.stats))
        diagnoser.feed_activations(activations)
    diagnoser.feed(0, norms, skipped)
    if update_ratios is not None and len(update_ratios):
        diagnoser.feed_updates(0, update_ratios,
                               None if skipped is None else skipped[:len(update_ratios)])
    return diagnoser.report(epoch_end_steps)
