"""The article's deep linear MLP for one epoch of 6,400 samples with plain `fit()`, no callback
of ours: Adam(1e-3) with and without `clipnorm=1.0`, the running loss every 20 steps, once with a
softmax output and `sparse_categorical_crossentropy`, once with logits and `from_logits=True` (how
`gradtools reproduce` trains the cases).

Shows what Keras itself does on each backend (docs/reproduction.md): on TensorFlow both give the
same losses (Keras takes the softmax's logits); on JAX and PyTorch Keras clips the softmax's
probabilities, and a saturated softmax stops the clipped run. Run it once per backend,

    KERAS_BACKEND=tensorflow python scripts/check_clipped_case.py
    KERAS_BACKEND=jax python scripts/check_clipped_case.py
    KERAS_BACKEND=torch python scripts/check_clipped_case.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_gradtools.data import load_mnist  # noqa: E402
from keras_gradtools.models import create_deep_linear_model  # noqa: E402


class _Loss(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch % 20 == 0:
            print(f"{batch}:{logs['loss']:.3f}", end=" ", flush=True)


def main():
    (x, y), _ = load_mnist(flatten=True, subset=6400)
    print(f"keras {keras.__version__} on {keras.backend.backend()}, seed 0")
    for logits in (False, True):
        for extra in ({}, {"clipnorm": 1.0}):
            keras.utils.set_random_seed(0)
            model = create_deep_linear_model(classifier_activation=None if logits else "softmax")
            model.compile(optimizer=keras.optimizers.Adam(1e-3, **extra),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits))
            print(f"{'logits' if logits else 'softmax'}, Adam(1e-3"
                  f"{', clipnorm=1.0' if extra else ''}): step:running loss ", end="")
            model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False,
                      callbacks=[_Loss()])
            print()


if __name__ == "__main__":
    main()
