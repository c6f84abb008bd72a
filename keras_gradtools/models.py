"""The article's models: two failure cases and the residual fix.

- `create_deep_sigmoid_model`: a deep stack of sigmoid layers, whose early
  layers' gradients vanish.
- `create_deep_linear_model`: a deep stack of linear layers, whose gradients
  explode under Adam.
- `ResNetBlock` and `resnet_model`: ReLU, He initialization, batch
  normalization and identity shortcuts, which keep the gradient alive.
"""

import keras

_PACKAGE = "keras_gradtools"


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def _deep_mlp(
    name, num_layers, units, activation, kernel_initializer, batch_norm,
    input_dim, num_classes, classifier_activation,
):
    _check_positive_int("num_layers", num_layers)
    _check_positive_int("units", units)
    _check_positive_int("input_dim", input_dim)
    _check_positive_int("num_classes", num_classes)
    model = keras.Sequential(name=name)
    model.add(keras.Input((input_dim,)))
    for i in range(num_layers + 1):
        model.add(
            keras.layers.Dense(
                units,
                activation=None if batch_norm else activation,
                kernel_initializer=kernel_initializer,
                name=f"dense_{i}",
            )
        )
        if batch_norm:
            model.add(keras.layers.BatchNormalization(name=f"bn_{i}"))
            model.add(keras.layers.Activation(activation, name=f"act_{i}"))
    model.add(
        keras.layers.Dense(
            num_classes, activation=classifier_activation, name="output"
        )
    )
    return model


def create_deep_sigmoid_model(
    num_layers=10,
    units=256,
    activation="sigmoid",
    kernel_initializer="glorot_uniform",
    batch_norm=False,
    input_dim=784,
    num_classes=10,
    classifier_activation="softmax",
):
    """Builds the article's deep sigmoid MLP, where gradients vanish.

    `input_dim -> Dense(units, activation) -> num_layers x Dense(units,
    activation) -> Dense(num_classes, softmax)`. With its defaults: 784 ->
    256 -> 10 x 256 -> 10, 861,450 parameters, Keras' default Glorot
    initialization: the article's model. The knobs try the fixes: for
    example `activation="relu", kernel_initializer="he_normal"`, or
    `batch_norm=True` (each hidden Dense is then followed by batch
    normalization, then the activation).

    Layers are named `dense_0` (the first hidden layer) to
    `dense_{num_layers}`, then `output`.

    Args:
        num_layers: hidden layers after the first. Defaults to `10`.
        units: width of every hidden layer. Defaults to `256`.
        activation: hidden activation. Defaults to `"sigmoid"`.
        kernel_initializer: hidden kernels' initializer. Defaults to
            `"glorot_uniform"`.
        batch_norm: batch normalization after each hidden Dense. Defaults
            to `False`.
        input_dim: input features. Defaults to `784`.
        num_classes: output classes. Defaults to `10`.
        classifier_activation: the output layer's activation; `None` gives
            logits (train them with `from_logits=True`). Defaults to
            `"softmax"`.

    Returns:
        An uncompiled `keras.Sequential`.

    Raises:
        ValueError: if a size is not a positive integer.

    Example:

    >>> create_deep_sigmoid_model().count_params()
    861450
    """
    return _deep_mlp(
        "deep_sigmoid", num_layers, units, activation, kernel_initializer,
        batch_norm, input_dim, num_classes, classifier_activation,
    )


def create_deep_linear_model(
    num_layers=20,
    units=256,
    activation="linear",
    kernel_initializer="glorot_uniform",
    batch_norm=False,
    input_dim=784,
    num_classes=10,
    classifier_activation="softmax",
):
    """Builds the article's deep linear MLP, where gradients explode.

    The same shape as `create_deep_sigmoid_model`, with 20 hidden layers
    after the first and no nonlinearity: 784 -> 256 -> 20 x 256 -> 10,
    1,519,370 parameters with the defaults. Trained with Adam at 1e-3 its
    loss and gradient norms blow up; `Adam(clipnorm=1.0)` tames it.

    Args:
        num_layers: hidden layers after the first. Defaults to `20`.
        units: width of every hidden layer. Defaults to `256`.
        activation: hidden activation. Defaults to `"linear"`.
        kernel_initializer: hidden kernels' initializer. Defaults to
            `"glorot_uniform"`.
        batch_norm: batch normalization after each hidden Dense. Defaults
            to `False`.
        input_dim: input features. Defaults to `784`.
        num_classes: output classes. Defaults to `10`.
        classifier_activation: the output layer's activation; `None` gives
            logits (train them with `from_logits=True`). Defaults to
            `"softmax"`.

    Returns:
        An uncompiled `keras.Sequential`.

    Raises:
        ValueError: if a size is not a positive integer.

    Example:

    >>> create_deep_linear_model().count_params()
    1519370
    """
    return _deep_mlp(
        "deep_linear", num_layers, units, activation, kernel_initializer,
        batch_norm, input_dim, num_classes, classifier_activation,
    )


def _pair(name, value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(
            f"`{name}` must be a positive integer or a pair of them. "
            f"Received: {name}={value!r}"
        )
    return value


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNetBlock(keras.layers.Layer):
    """The article's residual block, with a projection whenever shapes change.

    Two rounds of `Conv2D (He normal) -> activation -> BatchNormalization`,
    added to the shortcut, then the activation. The shortcut is the input
    itself when the shapes match, and a 1x1 `Conv2D` projection (with the
    block's strides) when either the strides or the number of channels
    change: the article projects only when strides change, so its
    `ResNetBlock(128, (3, 3))` after a 64-channel input fails to add; this
    one works.

    Args:
        num_filters: output channels.
        kernel_size: the convolutions' kernel size, an int or a pair.
        strides: the first convolution's (and the projection's) strides.
            Defaults to `(1, 1)`.
        activation: the activation. Defaults to `"relu"`.
        batch_norm: batch normalization after each convolution. Defaults
            to `True`.
        kernel_initializer: the convolutions' initializer. Defaults to
            `"he_normal"`.
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: for a non-positive `num_filters`, `kernel_size` or
            `strides`, or an input that is not 4-D.

    Example:

    >>> import numpy as np
    >>> block = ResNetBlock(128, (3, 3))
    >>> tuple(block(np.zeros((2, 7, 7, 64), "float32")).shape)
    (2, 7, 7, 128)
    """

    def __init__(
        self,
        num_filters,
        kernel_size,
        strides=(1, 1),
        activation="relu",
        batch_norm=True,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("num_filters", num_filters)
        self.num_filters = num_filters
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        self.activation = keras.activations.get(activation)
        self.batch_norm = bool(batch_norm)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        conv = dict(padding="same", kernel_initializer=self.kernel_initializer)
        self.conv1 = keras.layers.Conv2D(
            num_filters, self.kernel_size, strides=self.strides, name="conv1",
            **conv,
        )
        self.conv2 = keras.layers.Conv2D(
            num_filters, self.kernel_size, name="conv2", **conv
        )
        if self.batch_norm:
            self.bn1 = keras.layers.BatchNormalization(name="bn1")
            self.bn2 = keras.layers.BatchNormalization(name="bn2")
        self.shortcut = None

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "ResNetBlock expects 4-D inputs (batch, height, width, "
                f"channels). Received: input_shape={input_shape}"
            )
        self.conv1.build(input_shape)
        mid = self.conv1.compute_output_shape(input_shape)
        self.conv2.build(mid)
        if self.batch_norm:
            self.bn1.build(mid)
            self.bn2.build(mid)
        if self.strides != (1, 1) or input_shape[-1] != self.num_filters:
            self.shortcut = keras.layers.Conv2D(
                self.num_filters, (1, 1), strides=self.strides, padding="same",
                kernel_initializer=self.kernel_initializer, name="projection",
            )
            self.shortcut.build(input_shape)

    def call(self, inputs, training=None):
        x = self.activation(self.conv1(inputs))
        if self.batch_norm:
            x = self.bn1(x, training=training)
        x = self.activation(self.conv2(x))
        if self.batch_norm:
            x = self.bn2(x, training=training)
        shortcut = inputs if self.shortcut is None else self.shortcut(inputs)
        return self.activation(x + shortcut)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_filters": self.num_filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "activation": keras.activations.serialize(self.activation),
                "batch_norm": self.batch_norm,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


def resnet_model(
    input_shape=(28, 28, 1),
    num_classes=10,
    filters=(64, 64, 128, 128, 256, 256),
    strides=(1, 1, 2, 1, 2, 1),
    activation="relu",
    batch_norm=True,
    classifier_activation="softmax",
):
    """Builds the article's ResNet for MNIST: the fix for vanishing gradients.

    A 7x7/2 convolution stem (64 filters, He normal) with batch
    normalization and ReLU, a 3x3/2 max-pool, then one `ResNetBlock` per
    entry of `filters` (3x3 kernels, the matching `strides`), then flatten
    and a classifier (softmax by default). With its defaults: blocks 64, 64,
    128/2, 128, 256/2, 256 on 28x28x1 inputs, 2,791,946 parameters (3,712
    of them batch-norm moving statistics).

    Args:
        input_shape: image shape. Defaults to `(28, 28, 1)`.
        num_classes: output classes. Defaults to `10`.
        filters: channels of each block. Defaults to
            `(64, 64, 128, 128, 256, 256)`.
        strides: stride of each block (same length as `filters`). Defaults
            to `(1, 1, 2, 1, 2, 1)`.
        activation: the blocks' and stem's activation. Defaults to
            `"relu"`.
        batch_norm: batch normalization in the stem and blocks. Defaults to
            `True`.
        classifier_activation: the output layer's activation; `None` gives
            logits (train them with `from_logits=True`). Defaults to
            `"softmax"`.

    Returns:
        An uncompiled functional `keras.Model` named `resnet`.

    Raises:
        ValueError: if `filters` and `strides` differ in length.

    Example:

    >>> resnet_model().count_params()
    2791946
    """
    if len(filters) != len(strides):
        raise ValueError(
            "`filters` and `strides` must have the same length. "
            f"Received: filters={filters!r}, strides={strides!r}"
        )
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(
        64, (7, 7), strides=(2, 2), padding="same",
        kernel_initializer="he_normal", name="stem_conv",
    )(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation(activation, name="stem_act")(x)
    x = keras.layers.MaxPooling2D(
        (3, 3), strides=(2, 2), padding="same", name="stem_pool"
    )(x)
    for i, (f, s) in enumerate(zip(filters, strides)):
        x = ResNetBlock(
            f, (3, 3), strides=(s, s), activation=activation,
            batch_norm=batch_norm, name=f"block_{i}",
        )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, activation=classifier_activation, name="output"
    )(x)
    return keras.Model(inputs, outputs, name="resnet")
