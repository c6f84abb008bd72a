"""keras_gradtools: find and fix vanishing and exploding gradients in Keras 3.

The names below are imported on first use, and Keras with them: importing
the package alone does not import Keras, so that `gradtools --backend jax`
(or any program) can still choose the Keras backend. The first name used
checks the Keras and TensorFlow versions (`keras_gradtools.internals`).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ActivationProbe": "keras_gradtools.activations",
    "ActivationRecord": "keras_gradtools.activations",
    "clipped_optimizer": "keras_gradtools.clipping",
    "ClippedOptimizer": "keras_gradtools.clipping",
    "compute_weight_gradient_norms": "keras_gradtools.probe",
    "create_deep_linear_model": "keras_gradtools.models",
    "create_deep_sigmoid_model": "keras_gradtools.models",
    "diagnose_norms": "keras_gradtools.diagnose",
    "Finding": "keras_gradtools.diagnose",
    "global_norm": "keras_gradtools.norms",
    "gradient_norm": "keras_gradtools.norms",
    "gradient_norms": "keras_gradtools.norms",
    "GradientMonitor": "keras_gradtools.callbacks",
    "GradientProblemError": "keras_gradtools.callbacks",
    "GradNormLogger": "keras_gradtools.callbacks",
    "GradNormModel": "keras_gradtools.model",
    "GradNormRecorder": "keras_gradtools.recorder",
    "instrument_model": "keras_gradtools.tap",
    "is_bias": "keras_gradtools.norms",
    "is_chief": "keras_gradtools.tap",
    "load_mnist": "keras_gradtools.data",
    "loss_scale_of": "keras_gradtools.clipping",
    "recording": "keras_gradtools.tap",
    "Report": "keras_gradtools.diagnose",
    "resnet_model": "keras_gradtools.models",
    "ResNetBlock": "keras_gradtools.models",
    "variable_key": "keras_gradtools.norms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_gradtools' has no attribute {name!r}")
    importlib.import_module("keras_gradtools.internals")  # checks the versions
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
