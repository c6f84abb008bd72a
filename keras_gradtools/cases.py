"""The article's four experiments, as data (no Keras import: the CLI reads them first).

`keras_gradtools.experiments.run_experiment` trains them.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    """One of the article's experiments.

    Args:
        name: the case's name (`vanishing`, `resnet`, `exploding`, `clipped`).
        title: one line for people.
        model: the builder: `deep_sigmoid`, `deep_linear` or `resnet`.
        optimizer: keyword arguments of `keras.optimizers.Adam`.
        epochs: epochs. Defaults to `10`.
        batch_size: batch size. Defaults to `32`.
        seed: the seed for weights and shuffling. Defaults to `0`.
    """

    name: str
    title: str
    model: str
    optimizer: dict
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0

    @property
    def image_input(self):
        return self.model == "resnet"


CASES = {
    "vanishing": Case(
        "vanishing", "Deep sigmoid MLP (1 + 10 x 256): gradients vanish",
        "deep_sigmoid", {"learning_rate": 1e-3},
    ),
    "resnet": Case(
        "resnet", "ResNet (ReLU, He init, batch norm, shortcuts): the fix",
        "resnet", {"learning_rate": 1e-3},
    ),
    "exploding": Case(
        "exploding", "Deep linear MLP (1 + 20 x 256), Adam: gradients explode",
        "deep_linear", {"learning_rate": 1e-3},
    ),
    "clipped": Case(
        "clipped", "Deep linear MLP, Adam(clipnorm=1.0): clipping tames it",
        "deep_linear", {"learning_rate": 1e-3, "clipnorm": 1.0},
    ),
}

def get_case(name):
    """Returns the `Case` called `name`.

    Args:
        name: one of `CASES`.

    Returns:
        The `Case`.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in CASES:
        raise ValueError(
            f"Unknown case. Choose one of {', '.join(CASES)}. Received: case={name!r}"
        )
    return CASES[name]
