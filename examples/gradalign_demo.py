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

import hvd_gradalign as hga  # noqa: E402
from hvd_gradalign.data import make_pipelines  # noqa: E402


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
    # Each worker's shard, in full batches of global_batch / workers.
    data = make_pipelines("fashion_mnist", None, rank=hga.rank(), size=hga.size(),
                          global_batch=args.global_batch, seed=0, train_samples=args.samples)

    model = keras.Sequential([  # compile with GradAlign is all it needs
        keras.Input((28, 28, 1)), keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10),
    ])
    model.compile(
        optimizer=hga.GradAlign(keras.optimizers.SGD(args.lr, momentum=0.9), beta=args.beta,
                                micro_batches=args.micro_batches),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if hga.rank() == 0:
        print(f"workers={hga.size()} global_batch={args.global_batch} "
              f"micro_batches={args.micro_batches * hga.size()} beta={args.beta}", flush=True)
    model.fit(data.train_stream(), epochs=args.epochs, steps_per_epoch=data.steps_per_epoch,
              validation_data=data.test, callbacks=hga.callbacks(), verbose=2 if hga.rank() == 0 else 0)


if __name__ == "__main__":
    main()
