"""A subclassed Keras model with its own train_step that calls super(): the GradAlign
step runs inside it (here the override clips the inputs and logs an extra metric).
A train_step that does not call super() would bypass GradAlign; the library stops such
a model at its first step with an error instead of training it as plain SGD.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python examples/subclassed_train_step.py
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hvd_gradalign as hga  # noqa: E402
from hvd_gradalign.data import fashion_mnist_arrays  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--samples", type=int, default=20000, help="training images over all workers")
args = parser.parse_args()


class Classifier(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(128, activation="relu")
        self.dropout = keras.layers.Dropout(0.2)   # the same draw in both GradAlign passes
        self.out = keras.layers.Dense(10)
        self.input_norm = keras.metrics.Mean(name="input_norm")

    def call(self, x, training=False):
        return self.out(self.dropout(self.hidden(keras.ops.reshape(x, (-1, 784))), training=training))

    def train_step(self, data):
        x, y = data
        x = tf.clip_by_value(x, 0.0, 1.0)
        self.input_norm.update_state(tf.norm(tf.reshape(x, (tf.shape(x)[0], -1)), axis=1))
        logs = super().train_step((x, y))           # GradAlign's step
        return {**logs, "input_norm": self.input_norm.result()}


hga.init()
images, labels = fashion_mnist_arrays("train")
per = args.samples // hga.size()
mine = slice(hga.rank() * per, (hga.rank() + 1) * per)
x_train, y_train = images[mine].astype("float32") / 255, labels[mine]

model = Classifier()
model.compile(optimizer=hga.GradAlign(keras.optimizers.Adam(1e-3), beta=0.01, micro_batches=4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
history = model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, callbacks=hga.callbacks(),
                    verbose=2 if hga.rank() == 0 else 0)
test_images, test_labels = fashion_mnist_arrays("test")
accuracy = model.evaluate(test_images.astype("float32") / 255, test_labels, verbose=0, return_dict=True)["accuracy"]
if hga.rank() == 0:
    print(f"grad_variance logged: {'grad_variance' in history.history}")
    print(f"Test accuracy: {accuracy:.4f}")
weights = np.concatenate([w.ravel() for w in model.get_weights()])
print(f"rank {hga.rank()} weights checksum: {weights.astype(np.float64).sum():.10f}", flush=True)
