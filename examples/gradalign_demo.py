"""A short GradAlign run on the embedded Fashion-MNIST.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python examples/gradalign_demo.py

Each worker trains on its shard of a 12,000-image slice with GradAlign
(global batch 512 = 2 workers × 4 micro-batches × 64); rank 0 prints the
per-epoch loss, accuracy and gradient variance V (and V/‖ḡ‖²).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import hvd_gradalign as hga  # noqa: E402
from hvd_gradalign.data import fashion_mnist_arrays, shard_indices  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=4, help="per worker")
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=12000)
    args = parser.parse_args()

    hga.init()
    keras.utils.set_random_seed(1234 + hga.rank())
    x, y = fashion_mnist_arrays("train")
    x_test, y_test = fashion_mnist_arrays("test")
    idx = shard_indices(min(args.samples, len(x)), hga.rank(), hga.size())
    local_batch = args.global_batch // hga.size()
    train = (tf.data.Dataset.from_tensor_slices(((x[idx] / 255.0).astype("float32"), y[idx]))
             .shuffle(len(idx), seed=hga.rank()).batch(local_batch, drop_remainder=True))
    test_idx = shard_indices(len(x_test), hga.rank(), hga.size())
    test = tf.data.Dataset.from_tensor_slices(((x_test[test_idx] / 255.0).astype("float32"),
                                               y_test[test_idx])).batch(1000)

    model = hga.wrap(keras.Sequential([
        keras.Input((28, 28)), keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10),
    ]))
    model.compile(
        optimizer=hga.GradAlign(keras.optimizers.SGD(args.lr, momentum=0.9), beta=args.beta,
                                micro_batches=args.micro_batches),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if hga.rank() == 0:
        print(f"workers={hga.size()} global_batch={args.global_batch} "
              f"micro_batches={args.micro_batches * hga.size()} beta={args.beta}", flush=True)
    model.fit(train, epochs=args.epochs, validation_data=test, callbacks=hga.callbacks(),
              verbose=2 if hga.rank() == 0 else 0)


if __name__ == "__main__":
    main()
