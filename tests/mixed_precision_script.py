"""Mixed-precision cases on this worker (one process: size 1; under horovodrun: W).

    python tests/mixed_precision_script.py OUT_DIR
    horovodrun -np 2 -H localhost:2 --gloo python tests/mixed_precision_script.py OUT_DIR

Every case trains the oracle scenarios' MLP (tests/scenarios.py: same data, same
initial weights, same global batches) under a Keras dtype policy, and saves its final
weights, the optimizer's iteration count and loss scale, and its per-epoch logs.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import hvd_gradalign as hga  # noqa: E402
from tests import scenarios  # noqa: E402

POISON_STEP = 1  # the update whose batch holds, on the last worker only, a sample that overflows float16
INITIAL_SCALE = 2.0 ** 8  # low enough that no clean step overflows: only the poisoned one is skipped

# name -> (policy, optimizer, poisoned)
CASES = {
    "fp16_gradalign": ("mixed_float16", "gradalign", False),
    "bf16_gradalign": ("mixed_bfloat16", "gradalign", False),
    "fp32_gradalign": ("float32", "gradalign", False),
    "fp16_beta0": ("mixed_float16", "beta0", False),
    "fp16_data_parallel": ("mixed_float16", "distributed", False),
    "fp16_gradalign_poisoned": ("mixed_float16", "gradalign", True),
    "fp16_data_parallel_poisoned": ("mixed_float16", "distributed", True),
}
SCENARIO = {"gradalign": "ga_mlp_sgd", "beta0": "ga_beta0_mlp", "distributed": "dp_mlp"}


def build(policy, params):
    import keras

    keras.mixed_precision.set_global_policy(policy)
    model = keras.Sequential([keras.Input((scenarios.D,)),
                              keras.layers.Dense(scenarios.HIDDEN, activation="tanh"),
                              keras.layers.Dense(scenarios.K)])
    model.set_weights([p.astype(np.float32) for p in params])
    return model


def run(name, rank, size):
    import keras

    policy, kind, poisoned = CASES[name]
    _, spec, m_total = scenarios.SCENARIOS[SCENARIO[kind]]
    x, y = scenarios.data()
    x = x.copy()
    if poisoned:
        # 1e5 is finite in float32 and past float16's 65504: cast to float16 in the first
        # layer it is inf, and its gradient (inf × a saturated tanh's 0) is NaN, on this
        # worker's slice of that update only.
        x[POISON_STEP * scenarios.GLOBAL_BATCH + scenarios.GLOBAL_BATCH - 1] = 1e5
    params = scenarios.initial_params("mlp", seed=1 if rank == 0 else 100 + rank)
    model = build(policy, params)
    micro = 1 if m_total in (None, "one per worker") else m_total // size
    optimizer = scenarios.make_optimizer(spec, micro)
    if policy == "mixed_float16":
        # What compile() would build by itself, with a scale no clean step overflows.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=INITIAL_SCALE)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(scenarios.local_slice(x, rank, size), scenarios.local_slice(y, rank, size),
                        batch_size=scenarios.GLOBAL_BATCH // size, epochs=1, shuffle=False, verbose=0,
                        callbacks=hga.callbacks())
    scale = float(model.optimizer.dynamic_scale) if policy == "mixed_float16" else 0.0
    keras.mixed_precision.set_global_policy("float32")
    return model.get_weights(), int(model.optimizer.iterations), scale, history.history


def main(out_dir):
    hga.init()
    results = {"size": np.array(hga.size())}
    for name in CASES:
        weights, iterations, scale, history = run(name, hga.rank(), hga.size())
        for i, w in enumerate(weights):
            results[f"{name}/w{i}"] = w
        results[f"{name}/iterations"] = np.array(iterations)
        results[f"{name}/scale"] = np.array(scale)
        for key, values in history.items():
            results[f"{name}/history/{key}"] = np.asarray(values)
    np.savez(os.path.join(out_dir, f"rank{hga.rank()}.npz"), **results)


if __name__ == "__main__":
    main(sys.argv[1])
