"""Step throughput under each Keras dtype policy, for the data-parallel step and GradAlign.

    .venv/bin/python benchmarks/precision_throughput.py [--out benchmarks/results/precision_throughput.json]

One process (one worker) builds cnn2 (the experiments' model) once per (policy, method):
float32, mixed_bfloat16 and mixed_float16 (loss-scaled, as compile makes it), each with
DistributedOptimizer and GradAlign, all from the same initial weights. Their fits then
alternate, round after round, on the same batches, so that machine noise hits all alike.
A step's time is the gap between consecutive batch ends inside ``fit`` (a callback): the
first step of every fit is dropped (it may trace), and so is the end of ``fit``, which on
these machines can stall for seconds. Reported: median images/s per (policy, method), the
ratio of each policy to float32 per method, and GradAlign's cost over the data-parallel
step per policy. The CPU's bf16 support (AMX, AVX512-BF16) is written down with them:
without it bfloat16 matrix products are emulated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
METHODS = ("data_parallel", "gradalign")


def cpu_bf16_flags():
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f"))


def step_gaps(model, x, y, batch) -> list:
    """Seconds between consecutive batch ends in one epoch of ``model.fit`` over (x, y):
    one per step but the first, whose time includes tracing. Timed inside ``fit`` because
    a short ``fit`` call can stall for seconds at its end here."""
    import keras
    import numpy as np

    class BatchEnds(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    ends = BatchEnds()
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[ends])
    return list(np.diff(ends.ends))


def build(policy, method, weights, micro_batches):
    import keras

    import hvd_gradalign as hga
    from hvd_gradalign.models import build_model

    keras.mixed_precision.set_global_policy(policy)
    model = build_model("cnn2", (28, 28, 1), 10)
    keras.mixed_precision.set_global_policy("float32")
    if weights is not None:
        model.set_weights(weights)
    inner = keras.optimizers.SGD(0.01, momentum=0.9)
    opt = hga.DistributedOptimizer(inner) if method == "data_parallel" else \
        hga.GradAlign(inner, beta=0.05, micro_batches=micro_batches)
    if policy == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per fit (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/precision_throughput.json"))
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    import hvd_gradalign as hga

    hga.init()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch * args.steps, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    models, weights = {}, None
    for policy in args.policies:
        for method in METHODS:
            models[policy, method] = build(policy, method, weights, args.micro_batches)
            weights = weights or models[policy, method].get_weights()
    gaps = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            gaps[key] += step_gaps(model, x, y, args.batch)
    rows = []
    for (policy, method), g in gaps.items():
        step = statistics.median(g)
        rows.append({"policy": policy, "method": method, "median_step_s": step,
                     "images_per_s": args.batch / step, "steps_timed": len(g)})
    rate = {(r["policy"], r["method"]): r["images_per_s"] for r in rows}
    for r in rows:
        r["vs_float32"] = rate[r["policy"], r["method"]] / rate["float32", r["method"]] \
            if ("float32", r["method"]) in rate else None
        r["gradalign_cost_over_data_parallel"] = rate[r["policy"], "data_parallel"] / rate[r["policy"], "gradalign"]
    result = {
        "what": "cnn2 step throughput per Keras dtype policy, 1 worker, alternated fits (batch ends in fit)",
        "batch": args.batch, "micro_batches": args.micro_batches, "rounds": args.rounds,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "cpu_bf16_flags": cpu_bf16_flags(), "tensorflow": tf.__version__,
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'policy':16} {'method':14} {'images/s':>9} {'vs float32':>10} {'GA cost':>8}")
    for r in rows:
        vs = "" if r["vs_float32"] is None else f"{r['vs_float32']:.2f}x"
        print(f"{r['policy']:16} {r['method']:14} {r['images_per_s']:9.0f} {vs:>10} "
              f"{r['gradalign_cost_over_data_parallel']:7.2f}x")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
