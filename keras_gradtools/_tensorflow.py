"""TensorFlow, imported on first use.

keras_gradtools runs on Keras' JAX and PyTorch backends without TensorFlow
installed: modules refer to `tf` from here, and TensorFlow is imported the
first time one of its attributes is read, which only code for the
TensorFlow backend (or `tf.distribute`) does.
"""

import importlib


class _LazyTensorFlow:
    """Stands for the `tensorflow` module; imports it when an attribute is read."""

    def __getattr__(self, name):
        try:
            module = importlib.import_module("tensorflow")
        except ImportError as e:
            raise ImportError(
                f"This needs TensorFlow (`tf.{name}`), which is not installed; "
                "`pip install tensorflow`, or stay on what runs on the JAX and "
                f"PyTorch backends without it. ({e})"
            ) from None
        return getattr(module, name)


tf = _LazyTensorFlow()
