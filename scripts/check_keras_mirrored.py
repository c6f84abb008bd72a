"""Does plain Keras (no keras_gradtools) train alike on one device and under MirroredStrategy?

Trains the same small model from the same weights on the same 6 batches, once on one device and
once under MirroredStrategy on the CPU split into 2 logical devices, and prints the largest weight
difference. keras_gradtools supports several replicas only where this is ~1e-7 (Keras >= 3.8):
see docs/compatibility.md. Run: `python scripts/check_keras_mirrored.py`.
"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
rng = np.random.default_rng(4)
x = rng.normal(size=(96, 6)).astype("float32"); y = rng.integers(0, 3, 96)
def build():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3, activation="softmax")])
    return m
single = build(); w0 = single.get_weights()
single.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
single.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    mirrored = build(); mirrored.set_weights(w0)
    mirrored.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
mirrored.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
print("keras", keras.__version__, "max |w_single - w_mirrored| =", max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights())))
