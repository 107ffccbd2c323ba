"""A functional Keras model trained on a tf.data pipeline, with GradAlign: each worker
reads its own shard, shuffles it, and batches it without dropping the remainder (the
last, partial batch is cut into near-equal micro-batches like any other).

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python examples/functional_tf_data.py
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
parser.add_argument("--batch", type=int, default=100, help="per worker")
args = parser.parse_args()

hga.init()
images, labels = fashion_mnist_arrays("train")
# Equal shards (the remainder dropped): every worker takes the same number of steps.
per = args.samples // hga.size()
mine = slice(hga.rank() * per, (hga.rank() + 1) * per)
train = (tf.data.Dataset.from_tensor_slices((images[mine], labels[mine]))
         .shuffle(per, seed=hga.rank(), reshuffle_each_iteration=True)
         .map(lambda x, y: (tf.cast(x, tf.float32)[..., None] / 255.0, y))
         .batch(args.batch)                       # no drop_remainder
         .prefetch(tf.data.AUTOTUNE))
test_images, test_labels = fashion_mnist_arrays("test")
test = tf.data.Dataset.from_tensor_slices((test_images[..., None] / np.float32(255), test_labels)).batch(1000)

inputs = keras.Input((28, 28, 1))
x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
x = keras.layers.MaxPooling2D()(x)
x = keras.layers.Flatten()(x)
x = keras.layers.Dense(64, activation="relu")(x)
model = keras.Model(inputs, keras.layers.Dense(10)(x))
model.compile(optimizer=hga.GradAlign(keras.optimizers.SGD(0.05, momentum=0.9), beta=0.025, micro_batches=4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(train, epochs=args.epochs, callbacks=hga.callbacks(), verbose=2 if hga.rank() == 0 else 0)
accuracy = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
if hga.rank() == 0:
    print(f"Test accuracy: {accuracy:.4f}")
weights = np.concatenate([w.ravel() for w in model.get_weights()])
print(f"rank {hga.rank()} weights checksum: {weights.astype(np.float64).sum():.10f}", flush=True)
