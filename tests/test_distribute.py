"""Under tf.distribute with several replicas the logger refuses rather than report per-replica norms."""

import subprocess
import sys
import textwrap


def test_mirrored_strategy_is_refused_with_a_clear_error():
    # Logical devices must be configured before TensorFlow initializes: use a fresh process.
    code = textwrap.dedent("""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import numpy as np, keras
        from keras_gradtools import GradNormLogger
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            model.compile(optimizer="sgd", loss="mse")
        try:
            model.fit(np.ones((8, 4)), np.ones((8, 2)), batch_size=4, verbose=0,
                      callbacks=[GradNormLogger()])
        except ValueError as e:
            print("REFUSED:", e)
            print("APPLY_PATCHED:", "apply" in vars(model.optimizer))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "REFUSED: GradNormLogger does not support tf.distribute" in out.stdout, out.stderr[-2000:]
    assert "MirroredStrategy with 2 replicas" in out.stdout
    assert "APPLY_PATCHED: False" in out.stdout
