"""A training script in horovod.tensorflow.keras's documented style (Horovod's
tensorflow2_keras_mnist example, offline data); only the import line differs.

    python tests/horovod_style_script.py OUT MODEL OPTIMIZER WARMUP COMPRESSION
"""

import sys

import numpy as np
import tensorflow as tf

import hvd_gradalign.keras as hvd  # was: import horovod.tensorflow.keras as hvd

out, model_kind, opt_kind, warmup, compression = sys.argv[1:6]

hvd.init()

rng = np.random.default_rng(hvd.rank())  # every worker its own data
x = rng.random((256, 28, 28, 1), dtype=np.float32)
y = rng.integers(0, 10, 256)
dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(256, seed=hvd.rank()).batch(32)

# Different random weights on every worker: the broadcast must fix that.
tf.keras.utils.set_random_seed(100 + hvd.rank())
if model_kind == "sequential":  # no Input layer: built lazily, as the Horovod example is
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(8, [3, 3], activation="relu"),
        tf.keras.layers.MaxPooling2D(pool_size=(2, 2)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(16, activation="relu"),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
elif model_kind == "functional":
    inputs = tf.keras.Input((28, 28, 1))
    h = tf.keras.layers.Dense(16, activation="relu")(tf.keras.layers.Flatten()(inputs))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(10, activation="softmax")(h))
else:
    class Net(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.flatten = tf.keras.layers.Flatten()
            self.hidden = tf.keras.layers.Dense(16, activation="relu")
            self.out = tf.keras.layers.Dense(10, activation="softmax")

        def call(self, inputs):
            return self.out(self.hidden(self.flatten(inputs)))

    model = Net()

scaled_lr = 0.01 * hvd.size()
opt = (tf.keras.optimizers.SGD(scaled_lr, momentum=0.9) if opt_kind == "sgd"
       else tf.keras.optimizers.Adam(0.001 * hvd.size()))
opt = hvd.DistributedOptimizer(
    opt, compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none)
model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(), optimizer=opt,
              metrics=["accuracy"])

callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
if warmup == "warmup":
    callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
        initial_lr=scaled_lr if opt_kind == "sgd" else 0.001 * hvd.size(), warmup_epochs=2, verbose=1))
if hvd.rank() == 0:
    callbacks.append(tf.keras.callbacks.ModelCheckpoint(out + "/checkpoint.keras"))

history = model.fit(dataset, steps_per_epoch=4, callbacks=callbacks, epochs=3,
                    verbose=1 if hvd.rank() == 0 else 0)
np.savez(f"{out}/rank{hvd.rank()}.npz", *model.get_weights(),
         lr=np.array(history.history.get("lr", [])), size=hvd.size())
