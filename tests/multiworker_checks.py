"""MultiWorkerMirroredStrategy on 127.0.0.1: two worker processes and a one-process reference.

`python tests/multiworker_checks.py` starts two workers with `TF_CONFIG`
(free ports on 127.0.0.1), each training the same small model with the same
custom training loop under `tf.distribute.MultiWorkerMirroredStrategy`,
recording with `keras_gradtools.recording` and writing TensorBoard events
to one shared `log_dir` (only the chief does), then trains the same model
in one process without any strategy, and prints one JSON object: each
worker's recorded norms, the reference's, and the files in the shared
`log_dir`. `test_distribute.py` runs it; it is also the recipe the README's
"Scaling out" section follows.

Keras 3.15's `fit()` does not run under MultiWorkerMirroredStrategy (it
fails in Keras' own code before and inside the first step:
keras-team/keras#20585), hence the custom loop.

`--worker INDEX --ports P0,P1 --out DIR` is the worker mode (used by the
parent process).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GLOBAL_BATCH = 16
STEPS = 8


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype("float32")
    y = rng.integers(0, 3, GLOBAL_BATCH * STEPS)
    return x, y


def _model():
    import keras

    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", name="h1"),
        keras.layers.Dense(3, name="out"),
    ], name="mw")


def train(strategy, log_dir=None):
    """The custom loop: per-replica loss scaled to the global batch, `optimizer.apply`."""
    import keras
    import tensorflow as tf

    from keras_gradtools import GradNormRecorder, is_chief, recording
    from keras_gradtools.summaries import GradientSummaryWriter

    with strategy.scope():
        model = _model()
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    dataset = strategy.experimental_distribute_dataset(dataset)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(yb, model(xb, training=True))
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def train_step(batch):
        strategy.run(step, args=batch)

    recorder = GradNormRecorder(model.trainable_variables, include_biases=True)
    with recording(optimizer, recorder):
        for batch in dataset:
            train_step(batch)
        spec = dataset.element_spec
        recorded_ops = _op_types(train_step.get_concrete_function(spec))
    # The same step traced without the recording: same collective ops.
    plain_ops = _op_types(tf.function(lambda batch: strategy.run(step, args=batch))
                          .get_concrete_function(spec))
    recorder.collectives = {
        "recorded": sorted(t for t in recorded_ops if "Collective" in t or "AllReduce" in t),
        "plain": sorted(t for t in plain_ops if "Collective" in t or "AllReduce" in t),
    }
    if log_dir is not None and is_chief(strategy):
        writer = GradientSummaryWriter(log_dir)
        norms = recorder.norms
        writer.scalars(range(1, len(norms) + 1), recorder.keys, norms,
                       (norms ** 2).sum(axis=1) ** 0.5)
        writer.close()
    return recorder


def _op_types(concrete):
    """Op types of a traced function, nested functions included."""
    types = [op.type for op in concrete.graph.get_operations()]
    for function in concrete.graph._functions.values():
        types += [node.op for node in function.definition.node_def]
    return types


def worker(index, ports, out):
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    import tensorflow as tf

    from keras_gradtools import is_chief

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    recorder = train(strategy, log_dir=os.path.join(out, "logs"))
    print("RESULT " + json.dumps({
        "index": index, "replicas": strategy.num_replicas_in_sync,
        "is_chief": is_chief(strategy), "keys": recorder.keys,
        "collectives": recorder.collectives,
        "norms": recorder.norms.tolist(),
    }), flush=True)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main():
    out = tempfile.mkdtemp(prefix="gradtools-multiworker-")
    ports = _free_ports(2)
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i),
             "--ports", ",".join(map(str, ports)), "--out", out],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in workers:
            stdout, stderr = proc.communicate(timeout=300)
            lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"worker failed (exit {proc.returncode}):\n{stderr[-3000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
    import tensorflow as tf

    reference = train(tf.distribute.get_strategy())
    files = []
    for root, _, names in os.walk(out):
        files += [os.path.relpath(os.path.join(root, n), out) for n in names]
    print("RESULT " + json.dumps({
        "workers": results,
        "reference": {"keys": reference.keys, "norms": reference.norms.tolist()},
        "files": sorted(files), "out": out,
    }))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        worker(int(args["--worker"]), [int(p) for p in args["--ports"].split(",")],
               args["--out"])
    else:
        main()
