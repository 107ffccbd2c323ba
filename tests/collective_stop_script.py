"""Two workers, one of which decides alone to stop (run by tests/test_collective_stop.py):

    horovodrun -np 2 -H localhost:2 --gloo python tests/collective_stop_script.py CASE OUT_DIR

CASE nan: rank 1's third batch holds a NaN sample and stock keras.callbacks.TerminateOnNaN
stops rank 1 alone. CASE callback: a user callback sets stop_training on rank 0 alone after
its second batch. CASE none: nobody stops (4 batches). Each rank writes the batches it ran
and its BatchNorm moving mean before and after hga.callbacks()' AverageModelState."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import hvd_gradalign as hga  # noqa: E402


class Counter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


class MovingMean(keras.callbacks.Callback):
    """The BatchNorm layer's moving mean at the end of fit, where this callback runs."""

    def on_train_end(self, logs=None):
        self.value = [float(v) for v in self.model.layers[0].moving_mean.numpy()]


class StopOnRank0(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if hga.rank() == 0 and batch == 1:
            self.model.stop_training = True


def main(case, out_dir, optimizer):
    hga.init(require_horovod=True)
    rng = np.random.default_rng(hga.rank())
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    if case == "nan" and hga.rank() == 1:
        x[16] = np.nan  # batch 3 of 4 (batch size 8)
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    inner = keras.optimizers.SGD(0.1)
    opt = hga.GradAlign(inner, beta=0.1, micro_batches=2) if optimizer == "gradalign" else hga.DistributedOptimizer(inner)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    counter, before, after = Counter(), MovingMean(), MovingMean()
    own = [keras.callbacks.TerminateOnNaN()] if case == "nan" else [StopOnRank0()] if case == "callback" else []
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[before] + hga.callbacks() + own + [counter, after])
    with open(os.path.join(out_dir, f"rank{hga.rank()}.json"), "w") as f:
        json.dump({"batches": counter.batches, "moving_mean": [before.value, after.value]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "gradalign")
