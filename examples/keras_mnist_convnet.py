"""The Keras documentation's "Simple MNIST convnet", with GradAlign: only the compile
line and the Horovod lines (init, a shard per worker, the callbacks) are new.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python examples/keras_mnist_convnet.py
    .venv/bin/python examples/keras_mnist_convnet.py --epochs 1 --samples 6000   # one worker

The data is the embedded Fashion-MNIST (the same shape as MNIST). 30,000 training images
split over the workers leave a partial last batch after validation_split=0.1, which
GradAlign cuts into near-equal micro-batches like any other batch.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

import hvd_gradalign as hga  # noqa: E402
from hvd_gradalign.data import fashion_mnist_arrays  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--samples", type=int, default=30000, help="training images over all workers")
parser.add_argument("--steps-per-epoch", type=int, default=None, help="cut epochs short (for tests)")
args = parser.parse_args()

hga.init()
num_classes, input_shape = 10, (28, 28, 1)
(x_train, y_train), (x_test, y_test) = fashion_mnist_arrays("train"), fashion_mnist_arrays("test")
x_train = np.expand_dims(x_train[:args.samples].astype("float32") / 255, -1)
x_test = np.expand_dims(x_test.astype("float32") / 255, -1)
y_train = keras.utils.to_categorical(y_train[:args.samples], num_classes)
y_test = keras.utils.to_categorical(y_test, num_classes)
# Each worker its own shard, of equal size (so that all take the same number of steps).
per = len(x_train) // hga.size()
x_train = x_train[hga.rank() * per:(hga.rank() + 1) * per]
y_train = y_train[hga.rank() * per:(hga.rank() + 1) * per]

model = keras.Sequential([
    keras.Input(shape=input_shape),
    layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
    layers.MaxPooling2D(pool_size=(2, 2)),
    layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
    layers.MaxPooling2D(pool_size=(2, 2)),
    layers.Flatten(),
    layers.Dropout(0.5),
    layers.Dense(num_classes, activation="softmax"),
])
model.compile(loss="categorical_crossentropy",
              optimizer=hga.GradAlign(keras.optimizers.Adam(), beta=0.01, micro_batches=4),
              metrics=["accuracy"])
model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, validation_split=0.1,
          steps_per_epoch=args.steps_per_epoch, callbacks=hga.callbacks(),
          verbose=2 if hga.rank() == 0 else 0)
score = model.evaluate(x_test, y_test, verbose=0)
if hga.rank() == 0:
    print(f"Test loss: {score[0]:.4f}")
    print(f"Test accuracy: {score[1]:.4f}")
weights = np.concatenate([w.ravel() for w in model.get_weights()])
print(f"rank {hga.rank()} weights checksum: {weights.astype(np.float64).sum():.10f}", flush=True)
