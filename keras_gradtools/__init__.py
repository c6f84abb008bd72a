"""keras_gradtools: find and fix vanishing and exploding gradients in Keras 3."""

from keras_gradtools import internals as _internals

_internals.check_versions()

from keras_gradtools.callbacks import GradNormLogger
from keras_gradtools.callbacks import GradientMonitor
from keras_gradtools.callbacks import GradientProblemError
from keras_gradtools.clipping import ClippedOptimizer
from keras_gradtools.clipping import clipped_optimizer
from keras_gradtools.clipping import loss_scale_of
from keras_gradtools.data import load_mnist
from keras_gradtools.diagnose import Finding
from keras_gradtools.diagnose import Report
from keras_gradtools.diagnose import diagnose_norms
from keras_gradtools.models import ResNetBlock
from keras_gradtools.models import create_deep_linear_model
from keras_gradtools.models import create_deep_sigmoid_model
from keras_gradtools.models import resnet_model
from keras_gradtools.norms import gradient_norm
from keras_gradtools.norms import gradient_norms
from keras_gradtools.norms import global_norm
from keras_gradtools.norms import is_bias
from keras_gradtools.norms import variable_key
from keras_gradtools.probe import compute_weight_gradient_norms
from keras_gradtools.model import GradNormModel
from keras_gradtools.recorder import GradNormRecorder
from keras_gradtools.tap import instrument_model
from keras_gradtools.tap import is_chief
from keras_gradtools.tap import recording

__version__ = "0.1.0"

__all__ = [
    "ClippedOptimizer",
    "Finding",
    "GradNormLogger",
    "GradientMonitor",
    "GradientProblemError",
    "clipped_optimizer",
    "Report",
    "ResNetBlock",
    "create_deep_linear_model",
    "create_deep_sigmoid_model",
    "diagnose_norms",
    "load_mnist",
    "resnet_model",
    "GradNormModel",
    "GradNormRecorder",
    "compute_weight_gradient_norms",
    "global_norm",
    "gradient_norm",
    "gradient_norms",
    "instrument_model",
    "is_bias",
    "is_chief",
    "loss_scale_of",
    "recording",
    "variable_key",
]
