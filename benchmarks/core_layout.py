"""How to lay out training runs on a machine's cores: one run on all of them, or one
run pinned to each core (e.g. two sweep launchers under ``taskset``)?

    .venv/bin/python benchmarks/core_layout.py [--out benchmarks/results/core_layout.json]

Measures, side by side in one invocation, the cnn2 training step (data-parallel SGD on
one process, global batch 2048, synthetic Fashion-MNIST-shaped data) in two layouts:

- ``one_run_all_cores``: one process that may use every core;
- ``one_run_per_core``: as many processes as cores, each pinned to its own core, all
  stepping at once.

and writes images/s for each layout (summed over its processes) and their ratio. The
layouts alternate for ``--rounds`` rounds so that machine noise hits both alike; the
figure is the median over rounds. Linux only (``os.sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """Time ``args.steps`` steps after one warm-up step; print images/s."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    sys.path.insert(0, str(REPO))
    import keras
    import numpy as np

    import hvd_gradalign as hga
    from hvd_gradalign.models import build_model

    hga.init()
    keras.utils.set_random_seed(0)
    model = build_model("cnn2", (28, 28, 1), 10)
    model.compile(optimizer=hga.DistributedOptimizer(keras.optimizers.SGD(0.01, momentum=0.9)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    print(json.dumps({"images_per_sec": args.steps * args.batch / (time.perf_counter() - t0)}))


def _launch(core, args):
    cmd = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--steps", str(args.steps)]
    if core is not None:
        cmd += ["--core", str(core)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _throughput(cores, args) -> float:
    procs = [_launch(c, args) for c in cores]
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a benchmark worker failed ({p.returncode})")
        total += json.loads(out.strip().splitlines()[-1])["images_per_sec"]
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/core_layout.json"))
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    cores = sorted(os.sched_getaffinity(0))
    layouts = {"one_run_all_cores": [None], "one_run_per_core": cores}
    samples = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, placement in layouts.items():
            samples[name].append(_throughput(placement, args))
    median = {name: statistics.median(v) for name, v in samples.items()}
    result = {
        "command": "python benchmarks/core_layout.py " + " ".join(sys.argv[1:]),
        "model": "cnn2, data-parallel SGD step (DistributedOptimizer, 1 process each), synthetic data",
        "global_batch": args.batch, "steps_timed": args.steps, "rounds": args.rounds,
        "cores": len(cores),
        "images_per_sec_median": median,
        "images_per_sec_rounds": samples,
        "ratio_all_cores_over_per_core": median["one_run_all_cores"] / median["one_run_per_core"],
        "machine": {"processor": platform.machine(), "cpus": os.cpu_count()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
