"""Models and runs beyond the test suite's, checked with the plain-SGD identity on one backend.

With plain SGD (no momentum, no decay) each step moves every variable by
`lr * gradient`, so `||w_after - w_before|| / lr` is the norm of the gradient
that was applied. For each model below, `GradNormLogger(include_biases=True)`
records a few steps of a stock `fit()` and every recorded norm is compared
with that identity (weights read before and after each step by a callback).
Everything runs in float64 (`keras.config.set_floatx`; on JAX with
`JAX_ENABLE_X64`), so that the identity itself is exact to ~1e-12 and what
is printed is the recording's error (the recorder keeps float32 norms: about
6e-8); in float32 the identity's own rounding reaches 1e-3 for variables near
1 (layer normalization's gamma). Variables Keras keeps in float32 whatever
the policy (LoRA's) are allowed that rounding: `sqrt(size) * eps * max|w|`.

The zoo: a `keras.applications` base nested in a `Sequential` (transfer
learning) with activation probes; two outputs with loss weights, sample
weights and validation data; `class_weight` with `validation_split`; LoRA
(`enable_lora`); `Embedding(mask_zero=True)` into an LSTM; a trainable
variable the loss does not reach (recorded as 0); `add_loss` in `call`;
`TorchModuleWrapper` (PyTorch only); `PyDataset` with workers; and, where
keras-hub is importable, a GPT-2 backbone with a head, a BERT classifier and
a keras-hub ResNet, each built from a small config (no download). Then
Muon, AdamW with EMA and Lion, whose first step must record what plain SGD
records from the same weights and batch.

Run it once per backend (about a minute each on 2 CPU cores):

    python scripts/check_model_zoo.py --backend tensorflow
    python scripts/check_model_zoo.py --backend jax
    python scripts/check_model_zoo.py --backend torch

It prints one line per model, the largest relative error over every step
and variable, and exits with status 1 if any exceeds `--rtol` (1e-6).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_BACKEND = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--backend"),
                None)
if _BACKEND in ("tensorflow", "jax", "torch"):
    os.environ["KERAS_BACKEND"] = _BACKEND
if os.environ.get("KERAS_BACKEND") == "jax":
    os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 variables on JAX

import click  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradtools import GradientMonitor, GradNormLogger  # noqa: E402
from keras_gradtools.norms import to_numpy  # noqa: E402

LR = 0.05


class _Moves(keras.callbacks.Callback):
    """Each step's `||w_after - w_before||` per trainable variable, and how far rounding the
    weights to their dtype can move that norm (`sqrt(size) * eps * max|w|`, before and after)."""

    def __init__(self):
        super().__init__()
        self.moves, self.rounding = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = {v.path: to_numpy(v.value) for v in self.model.trainable_variables}

    def on_train_batch_end(self, batch, logs=None):
        moves, rounding = {}, {}
        for v in self.model.trainable_variables:
            before, after = self.before[v.path], to_numpy(v.value)
            moves[v.path] = float(np.linalg.norm(after.astype(np.float64) - before))
            rounding[v.path] = float(np.sqrt(after.size) * np.finfo(after.dtype).eps
                                     * (np.abs(before).max() + np.abs(after).max()))
        self.moves.append(moves)
        self.rounding.append(rounding)


def _identity(model, x, y=None, loss="sparse_categorical_crossentropy", fit_kw=None,
              logger_kw=None, compile_kw=None):
    """Largest relative error of the recorded norms against ||dw||/lr; step and key counts."""
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss, **(compile_kw or {}))
    logger = GradNormLogger(include_biases=True, **(logger_kw or {}))
    moves = _Moves()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[moves, logger, GradientMonitor(logger)],
              **{"batch_size": 8, **(fit_kw or {})})
    if set(logger.history) != set(moves.moves[0]):
        raise AssertionError(f"recorded {sorted(logger.history)}, trained {sorted(moves.moves[0])}")
    worst = 0.0
    for step, (move, rounding) in enumerate(zip(moves.moves, moves.rounding)):
        scale = max(move.values()) / LR
        for key, distance in move.items():
            expected = distance / LR
            # Beyond what rounding the weights can explain (float32 variables: LoRA's).
            excess = max(0.0, abs(logger.history[key][step] - expected) - rounding[key] / LR)
            worst = max(worst, excess / max(expected, 1e-9 * scale, 1e-300))
    return worst, len(moves.moves), len(logger.history)


def _data(n=32, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)), rng.integers(0, classes, n)


def _mlp(name="mlp"):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="h"),
                             keras.layers.Dense(3, activation="softmax", name="out")], name=name)


def applications_base():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 32, 32, 3)), rng.integers(0, 4, 16)
    base = keras.applications.MobileNetV2(weights=None, include_top=False,
                                          input_shape=(32, 32, 3), alpha=0.35)
    model = keras.Sequential([keras.Input((32, 32, 3)), base,
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(4, activation="softmax")])
    return _identity(model, x, y, logger_kw={"probe_data": x[:8], "activation_freq": 1})


def two_outputs():
    x, labels = _data()
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="h")(inputs)
    outputs = {"a": keras.layers.Dense(3, name="a")(h), "b": keras.layers.Dense(1, name="b")(h)}
    y = {"a": labels, "b": np.random.default_rng(1).normal(size=(32, 1))}
    weights = np.random.default_rng(2).uniform(0.1, 2.0, 32)
    return _identity(
        keras.Model(inputs, outputs), x, y,
        loss={"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "b": "mse"},
        compile_kw={"loss_weights": {"a": 1.0, "b": 0.3}},
        fit_kw={"sample_weight": weights,
                "validation_data": (x[:8], {"a": y["a"][:8], "b": y["b"][:8]})})


def class_weight():
    x, y = _data()
    return _identity(_mlp(), x, y, fit_kw={"class_weight": {0: 0.2, 1: 1.0, 2: 3.0},
                                           "validation_split": 0.25})


def lora():
    x, y = _data()
    model = _mlp()
    model.get_layer("h").enable_lora(2)
    return _identity(model, x, y)


def masked_lstm():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, (32, 7)).astype("int32")
    ids[:, 4:] = 0
    model = keras.Sequential([keras.Input((7,), dtype="int32"),
                              keras.layers.Embedding(20, 4, mask_zero=True),
                              keras.layers.LSTM(5), keras.layers.Dense(3, activation="softmax")])
    return _identity(model, ids, rng.integers(0, 3, 32))


class _Unused(keras.Model):
    def __init__(self):
        super().__init__(name="unused")
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.spare = keras.layers.Dense(4)  # trainable, never called
        self.out = keras.layers.Dense(3, activation="softmax")

    def build(self, shape):
        self.spare.build(shape)
        super().build(shape)

    def call(self, x):
        return self.out(self.hidden(x))


def unused_variable():
    x, y = _data()
    model = _Unused()
    model(x[:2])
    return _identity(model, x, y)


class _AddLoss(keras.Model):
    def __init__(self):
        super().__init__(name="add_loss")
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        h = self.hidden(x)
        self.add_loss(0.1 * keras.ops.mean(keras.ops.sum(h * h, axis=-1)))
        return self.out(h)


def add_loss():
    x, y = _data()
    model = _AddLoss()
    model(x[:2])
    return _identity(model, x, y)


def torch_module():
    import torch

    class Wrapped(keras.Model):
        def __init__(self):
            super().__init__(name="wrapped")
            module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()).double()
            self.body = keras.layers.TorchModuleWrapper(module)
            self.out = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.out(self.body(x))

    x, y = _data()
    model = Wrapped()
    model(x[:2])
    return _identity(model, x, y)


def py_dataset():
    x, y = _data()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]

    return _identity(_mlp(), Batches(workers=2), fit_kw={"batch_size": None})


def _hub():
    import keras_hub  # noqa: F401  (skipped where it is not installed)

    return keras_hub


# The transformers' size: two blocks of width 16 over 12 tokens, no dropout (a replay-free step).
_TINY = {"num_layers": 2, "num_heads": 2, "hidden_dim": 16, "intermediate_dim": 32,
         "max_sequence_length": 12, "dropout": 0.0}


def _tokens(rng, vocabulary):
    """32 sequences of 12 token ids, unpadded."""
    return {"token_ids": rng.integers(0, vocabulary, (32, 12)).astype("int32"),
            "padding_mask": np.ones((32, 12), "int32")}


def hub_gpt2():
    keras_hub = _hub()
    rng = np.random.default_rng(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=50, **_TINY)
    ids = keras.Input((12,), dtype="int32", name="token_ids")
    mask = keras.Input((12,), dtype="int32", name="padding_mask")
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    model = keras.Model({"token_ids": ids, "padding_mask": mask},
                        keras.layers.Dense(3)(hidden[:, 0]))
    x = _tokens(rng, 50)
    # Its activations all sit inside keras-hub's transformer blocks: read as they are called.
    return _identity(model, x, rng.integers(0, 3, 32),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     logger_kw={"probe_data": {k: v[:8] for k, v in x.items()},
                                "activation_freq": 1})


def hub_bert():
    keras_hub = _hub()
    rng = np.random.default_rng(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=60, **_TINY)
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2,
                                                preprocessor=None, dropout=0.0)
    x = dict(_tokens(rng, 60), segment_ids=np.zeros((32, 12), "int32"))
    return _identity(model, x, rng.integers(0, 2, 32),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     logger_kw={"probe_data": {k: v[:8] for k, v in x.items()}})


def hub_resnet():
    keras_hub = _hub()
    rng = np.random.default_rng(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(16, 16, 3))
    model = keras_hub.models.ImageClassifier(backbone=backbone, num_classes=4,
                                             preprocessor=None)
    x = rng.normal(size=(16, 16, 16, 3))
    return _identity(model, x, rng.integers(0, 4, 16),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     logger_kw={"probe_data": x[:8]})


def other_optimizers():
    """The first step's norms under Muon, AdamW with EMA and Lion against plain SGD's."""
    x, y = _data(8)
    first = {}
    for name, make in (("sgd", lambda: keras.optimizers.SGD(0.1)),
                       ("muon", lambda: keras.optimizers.Muon(0.02)),
                       ("adamw_ema", lambda: keras.optimizers.AdamW(0.01, use_ema=True)),
                       ("lion", lambda: keras.optimizers.Lion(1e-3))):
        if name == "muon" and not hasattr(keras.optimizers, "Muon"):
            continue  # Keras 3.10 and later
        keras.utils.set_random_seed(0)
        model = _mlp()
        model.compile(optimizer=make(), loss="sparse_categorical_crossentropy")
        logger = GradNormLogger(include_biases=True)
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[logger])
        if not np.isfinite(logger.norms).all() or len(logger.norms) != 3:
            raise AssertionError(f"{name}: {logger.norms}")
        first[name] = logger.norms[0]
    worst = max(float(np.max(np.abs(first[n] - first["sgd"]) / first["sgd"])) for n in first)
    return worst, 3, len(first["sgd"])


CHECKS = [applications_base, two_outputs, class_weight, lora, masked_lstm, unused_variable,
          add_loss, torch_module, py_dataset, hub_gpt2, hub_bert, hub_resnet, other_optimizers]


@click.command()
@click.option("--backend", type=click.Choice(["tensorflow", "jax", "torch"]), default=None,
              help="The Keras backend (default: the KERAS_BACKEND variable).")
@click.option("--rtol", type=float, default=1e-6, show_default=True,
              help="The largest relative error accepted.")
def main(backend, rtol):
    keras.config.set_floatx("float64")
    print(f"keras {keras.__version__} on {keras.backend.backend()}, float64, SGD lr {LR}")
    failed = False
    for check in CHECKS:
        if check is torch_module and keras.backend.backend() != "torch":
            continue
        keras.utils.set_random_seed(0)
        try:
            worst, steps, keys = check()
        except ImportError as error:
            print(f"  {check.__name__:<18} skipped ({error})")
            continue
        verdict = "ok" if worst <= rtol else "FAILED"
        failed |= worst > rtol
        print(f"  {check.__name__:<18} {steps} steps, {keys:>3} variables, "
              f"max relative error {worst:.1e}  {verdict}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
