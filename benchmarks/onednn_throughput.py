"""Step throughput with TensorFlow's oneDNN CPU kernels on and off, for the data-parallel
step and GradAlign, on one core.

    .venv/bin/python benchmarks/onednn_throughput.py [--out benchmarks/results/onednn_throughput.json]

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, and on x86 CPUs without
AVX-512 it leaves oneDNN off unless asked. So the two settings need two processes: each
round starts one child per setting, one after the other, pinned to the same core, and the
rounds alternate their order so that machine noise hits both alike. A child builds cnn2
(the experiments' model) for the data-parallel step and for GradAlign (the same initial
weights) and fits each for a few steps on synthetic batches; a step's time is the gap
between consecutive batch ends inside ``fit`` (a callback; the first step, which traces,
and the end of ``fit``, which can stall for seconds here, are dropped). Each child also
reports whether TensorFlow has oneDNN on (``IsMklEnabled``), so the file says what ran.
Reported: the median images/s per (setting, method) and the ratio on / off per method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("data_parallel", "gradalign")
SETTINGS = {"off": "0", "on": "1"}


def child(args) -> dict:
    import numpy as np
    from tensorflow.python.util import _pywrap_util_port

    import hvd_gradalign as hga
    from benchmarks.precision_throughput import build, step_gaps

    hga.init()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch * args.steps, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    gaps, weights = {}, None
    for method in METHODS:
        model = build("float32", method, weights, args.micro_batches)
        weights = weights or model.get_weights()
        gaps[method] = step_gaps(model, x, y, args.batch)
    return {"onednn": bool(_pywrap_util_port.IsMklEnabled()), "gaps": gaps}


def run_child(setting, args) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": SETTINGS[setting], "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--steps", str(args.steps),
               "--micro-batches", str(args.micro_batches)]
    if args.core is not None:
        command = ["taskset", "-c", str(args.core), *command]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps per fit (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--core", type=int, default=0, help="the core every child is pinned to")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/onednn_throughput.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    gaps = {(s, m): [] for s in SETTINGS for m in METHODS}
    reported = {s: set() for s in SETTINGS}
    for r in range(args.rounds):
        for setting in (SETTINGS if r % 2 == 0 else reversed(SETTINGS)):
            result = run_child(setting, args)
            reported[setting].add(result["onednn"])
            for method, g in result["gaps"].items():
                gaps[setting, method] += g
    rate = {key: args.batch / statistics.median(g) for key, g in gaps.items()}
    result = {
        "what": "cnn2 step throughput, TensorFlow oneDNN kernels on vs off, 1 worker on 1 core, "
                "alternated child processes (batch ends in fit)",
        "command": "python benchmarks/onednn_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": args.batch, "micro_batches": args.micro_batches, "rounds": args.rounds,
        "steps_timed_each": {f"{s}/{m}": len(g) for (s, m), g in gaps.items()},
        "onednn_reported_by_tensorflow": {s: sorted(v) for s, v in reported.items()},
        "images_per_s": {f"{s}/{m}": rate[s, m] for s, m in gaps},
        "ratio_on_over_off": {m: rate["on", m] / rate["off", m] for m in METHODS},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "cpu_model": _cpu_model()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for m in METHODS:
        print(f"{m:14} off {rate['off', m]:7.0f} images/s   on {rate['on', m]:7.0f} images/s   "
              f"on/off {rate['on', m] / rate['off', m]:.2f}x")
    print(f"written: {args.out}")


def _cpu_model() -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


if __name__ == "__main__":
    main()
