"""`GradNormModel`: a `keras.Model` whose own train step records gradient norms."""

import keras
from keras_gradtools._tensorflow import tf

from keras_gradtools import clipping
from keras_gradtools import internals
from keras_gradtools.callbacks import GradNormLogger
from keras_gradtools import tap
from keras_gradtools.tap import ordered_after


@keras.saving.register_keras_serializable(package="keras_gradtools")
class GradNormModel(keras.Model):
    """A `keras.Model` whose GradientTape train step records gradient norms.

    Use it as the base class of a subclassed model (or wrap inputs and
    outputs as with `keras.Model(inputs, outputs)`) when you want the
    recording in plain sight rather than through `GradNormLogger`'s
    instrumentation. The train step follows Keras' own, in three phases
    (forward, gradients, update); between the last two it hands the
    gradients to `record_gradient_norms()`, which feeds every recorder in
    `gradtools_recorders`. A subclass that writes its own `train_step`
    calls `self.record_gradient_norms(gradients, variables)` the same way.

    `fit()` attaches a `GradNormLogger` when none is given, so that the
    norms are always read; it is kept as `model.grad_norm_logger`.

    Keras' limit, as for any `keras.Model` subclass used both ways: once
    `GradNormModel(inputs, outputs)` (or a subclass's) has been made in a
    process, Keras has put `Functional` among the class's bases, and a
    model subclassed from it can no longer be made there (`TypeError:
    Functional.__init__() missing 2 required positional arguments`). Use
    one of the two ways per process.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((3,))
    >>> outputs = keras.layers.Dense(1, name="out")(inputs)
    >>> model = GradNormModel(inputs, outputs)
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> _ = model.fit(np.ones((8, 3)), np.zeros((8, 1)), batch_size=4,
    ...               epochs=1, verbose=0)
    >>> model.grad_norm_logger.history["out/kernel"].shape
    (2,)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A plain list is tracked by Keras; keep the recorders out of sight
        # of tracking and saving.
        object.__setattr__(self, "gradtools_recorders", [])
        object.__setattr__(self, "grad_norm_logger", None)

    def record_gradient_norms(self, gradients, variables, scale=None):
        """Feeds the gradients to every recorder in `gradtools_recorders`.

        Call it inside `train_step`, after the gradients are computed and
        before they are applied, and apply what it returns: the same
        gradients, each ordered after its norm so that its update does not
        compete with it (the cheap order; applying the original list is
        correct too, only slower on a CPU).

        Under a `LossScaleOptimizer` a step whose gradients are not all
        finite is recorded as skipped (`GradNormLogger.skipped_steps`), as
        the optimizer skips it: the monitor does not take it for a
        non-finite gradient.

        Args:
            gradients: the gradients, one per variable.
            variables: the variables, in the same order.
            scale: the loss scale to divide out, or `None` to use the
                optimizer's (see `loss_scale_of`). Defaults to `None`.

        Returns:
            The gradients to apply, a list in the same order.
        """
        if not self.gradtools_recorders:
            return list(gradients)
        if scale is None:
            scale = clipping.loss_scale_of(self.optimizer)
        gradients = list(gradients)
        variables = list(variables)
        loss_scale = clipping.layout(self.optimizer).loss_scale
        skipped = None
        if loss_scale is not None:  # the loss-scale optimizer's own public test
            skipped = keras.ops.logical_not(loss_scale.check_finite(gradients))
        shared = {}
        for recorder in self.gradtools_recorders:
            recorder.bind(variables)  # a model built by this trace (TensorFlow)
            recorder.write(recorder.step_norms(gradients, variables, scale, shared), skipped)
        return ordered_after(shared, gradients)

    def train_step(self, data):
        if keras.backend.backend() == "torch":
            return self._torch_train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        # Forward pass
        with tf.GradientTape() as tape:
            y_pred = internals.forward(self, x)
            loss = internals.compute_loss(self, x, y, y_pred, sample_weight)
            internals.track_loss(self, loss, x)
            scaled_loss = self.optimizer.scale_loss(loss)

        # Compute gradients
        trainable_variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, trainable_variables)
        gradients = self.record_gradient_norms(gradients, trainable_variables)

        # Update weights
        self.optimizer.apply(gradients, trainable_variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _torch_train_step(self, data):
        """Keras' PyTorch train step, with the recording between backward and update."""
        import torch

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self.zero_grad()
        y_pred = internals.forward(self, x)
        loss = internals.compute_loss(self, x, y, y_pred, sample_weight)
        internals.track_loss(self, loss, x)
        scaled_loss = self.optimizer.scale_loss(loss)
        if self.trainable_weights:
            scaled_loss.backward()
            trainable_variables = self.trainable_weights
            gradients = [v.value.grad for v in trainable_variables]
            with torch.no_grad():
                gradients = self.record_gradient_norms(gradients, trainable_variables)
                self.optimizer.apply(gradients, trainable_variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def fit(self, *args, callbacks=None, **kwargs):
        tap.check_backend("GradNormModel", ("tensorflow", "torch"), tap.JAX_HINT)
        # Recorders of an earlier fit() that ended in an exception.
        del self.gradtools_recorders[:]
        callbacks = list(callbacks or [])
        if not any(isinstance(c, GradNormLogger) for c in callbacks):
            if self.grad_norm_logger is None:
                object.__setattr__(self, "grad_norm_logger", GradNormLogger())
            callbacks.append(self.grad_norm_logger)
        return super().fit(*args, callbacks=callbacks, **kwargs)
