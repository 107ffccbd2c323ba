"""A Keras script whose workers hold shards of different sizes, under horovodrun.

    horovodrun -np 2 ... python tests/unequal_shards_script.py OUT_DIR SAMPLES_RANK0 SAMPLES_RANK1

Writes OUT_DIR/rank{r}.txt: "trained" or the error fit raised."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import hvd_gradalign as hga  # noqa: E402

out, counts = sys.argv[1], [int(c) for c in sys.argv[2:4]]
hga.init(require_horovod=True)
rng = np.random.default_rng(hga.rank())
n = counts[hga.rank()]
x, y = rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
model.compile(optimizer=hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
try:
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=hga.callbacks())
    result = "trained"
except ValueError as err:
    result = str(err)
with open(os.path.join(out, f"rank{hga.rank()}.txt"), "w") as f:
    f.write(result)
