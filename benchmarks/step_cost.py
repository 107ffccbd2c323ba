"""Step cost of GradAlign relative to DistributedOptimizer, on 2 workers.

    .venv/bin/python benchmarks/step_cost.py [--out benchmarks/results/step_cost.json]

Starts horovodrun itself. Timing: one 2-worker job builds the same model three
times (DistributedOptimizer; GradAlign; GradAlign with β = 0, i.e. its first
pass alone with the same micro-batches) and alternates their steps on the same global batch, so that machine noise hits both alike;
the ratio is median(GradAlign step) / median(DistributedOptimizer step) after
warm-up. The physical floor is 2.0 (two forward/backward passes per sample).
Memory: one 2-worker job per optimizer; each reports the peak resident memory
of its process (and the peak device memory on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.launch import horovodrun_command, subprocess_env  # noqa: E402


def build(kind, args):
    import keras

    import hvd_gradalign as hga

    keras.utils.set_random_seed(0)
    model = hga.wrap(keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 5, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 5, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10),
    ]))
    inner = keras.optimizers.SGD(0.01, momentum=0.9)
    if kind == "data_parallel":
        opt = hga.DistributedOptimizer(inner)
    else:  # gradalign_beta0: the first pass alone, same micro-batching
        opt = hga.GradAlign(inner, beta=0.005 if kind == "gradalign" else 0.0,
                            micro_batches=args.micro_batches)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def worker(args):
    import numpy as np

    import hvd_gradalign as hga

    hga.init(require_horovod=True)
    rng = np.random.default_rng(hga.rank())
    local = args.global_batch // hga.size()
    x = rng.random((local, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=local)
    kinds = ["data_parallel", "gradalign_beta0", "gradalign"] if args.kind == "all" else [args.kind]
    models = {k: build(k, args) for k in kinds}
    times = {k: [] for k in kinds}
    for step in range(args.warmup + args.steps):
        for k in kinds:
            t0 = time.perf_counter()
            models[k].train_on_batch(x, y)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times[k].append(dt)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak_mb = None
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        gpu_peak_mb = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    if hga.rank() == 0:
        Path(args.result).write_text(json.dumps(
            {"times": times, "peak_rss_mb": peak_rss_mb, "gpu_peak_mb": gpu_peak_mb}))


def launch(kind, args, result):
    cmd = horovodrun_command(args.workers, [__file__, "--worker", "--kind", kind, "--result", result, "--global-batch", str(args.global_batch),
           "--micro-batches", str(args.micro_batches), "--steps", str(args.steps),
           "--warmup", str(args.warmup)])
    subprocess.run(cmd, check=True, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(Path(result).read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/step_cost.json"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--micro-batches", type=int, default=4, help="per worker")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="all", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        timed = launch("all", args, f"{tmp}/all.json")
        memory = {k: launch(k, args, f"{tmp}/{k}.json") for k in ("data_parallel", "gradalign")}
    med = {k: statistics.median(v) for k, v in timed["times"].items()}
    import tensorflow as tf

    report = {
        "command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]),
        "model": "2-conv CNN (Fashion-MNIST shape), 28x28x1 inputs, synthetic data",
        "workers": args.workers,
        "global_batch": args.global_batch,
        "micro_batches_per_worker": args.micro_batches,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "median_step_s": med,
        "ratio_gradalign_over_data_parallel": med["gradalign"] / med["data_parallel"],
        # GradAlign against its own first pass (same micro-batching, β = 0):
        # isolates the second pass from the effect of micro-batching on speed.
        "ratio_gradalign_over_gradalign_beta0": med["gradalign"] / med["gradalign_beta0"],
        "physical_floor": 2.0,
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in memory.items()},
        "gpu_peak_mb": {k: v["gpu_peak_mb"] for k, v in memory.items()},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "gpus": len(tf.config.list_physical_devices("GPU")), "tensorflow": tf.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
