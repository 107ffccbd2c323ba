"""Time to target on W workers, on paper: measured compute and updates, modelled communication.

    python benchmarks/scaling_model.py [--inputs benchmarks/scaling_inputs.json] [--out FILE]

For each method and W = 1, 2, 4, ..., 1024 workers holding 128 samples each (global batch
B = 128·W), the predicted time to reach small-batch SGD's validation accuracy is

    T(W) = U(B) · (t_compute + A · t_allreduce)
    t_compute   = passes · 128 / r                 one worker's share of an update
    t_allreduce = 2(W−1) · α + 2(W−1)/W · S / β     ring allreduce of S bytes (Patarasuk & Yuan 2009)

with, per method:
- U(B): updates to target, *measured* (``sweeps targets``: the setting chosen on validation
  at each batch, the mean over the seeds that reached it, first evaluation at or above the
  target; the inputs line says how many seeds did) at the batches that were run, and
  interpolated log-log between them; never extrapolated: a batch beyond the largest one
  measured is predicted only where that is the full training set (8,192 here), where a
  larger batch cannot change the update, so U stays at its full-batch value (marked *);
- r: images per second of one worker, *measured* on this machine (the median over the
  reports' finished runs of that method at one batch, ``rate_batch``, one core per run,
  micro-batches of 128, timed inside fit), all under one set of CPU kernels: TensorFlow's
  oneDNN and Eigen kernels differ here by 1.4x (two-pass step) to 2x (SGD's), so mixing
  them would tilt the comparison. The kernels are the first of oneDNN, Eigen, unrecorded
  (the results' ``onednn`` column: on, off, '') under which every method has a run; where
  none covers them all, each method takes the first it has, and the table says so; passes = 2 for
  GradAlign, SAM and the penalty, 1 for SGD (r already includes them when read from a
  two-pass run, so t_compute = 128 / r there);
- A: allreduces per update, 2 for GradAlign and SAM-global (ḡ is needed before the second
  pass), 2 for SAM per micro-batch and the penalty as this library runs them (the first
  allreduce carries V; without the V log they need 1), 1 for SGD;
- α (latency per message) and β (bandwidth per link) and S (the gradient's bytes) are
  *assumed* (the inputs file says so; defaults: a 100 Gb/s InfiniBand-class link, 5 µs).

What it leaves out: overlap of communication with the backward pass (which favours SGD,
whose one allreduce can overlap; GradAlign's first cannot), stragglers, and the input
pipeline. It is a model for reading the measured numbers, not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_WORKER = 128
WORKERS = [2 ** k for k in range(11)]
TWO_PASS = {"gradalign", "sam", "sam_global", "asam", "asam_global", "grad_penalty"}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


KERNELS = {"on": "oneDNN", "off": "Eigen", "": "unrecorded"}  # in order of preference


def rates(results_csvs, batch) -> dict:
    """{method: (images/s of one worker, kernels)}: the median over finished runs at
    ``batch`` (one worker each, micro-batches of 128: the per-worker work of the model)
    with a rate, under the first KERNELS that every method was measured under, else under
    the first each method was measured under. Runs whose kernels changed between sessions
    (``mixed``) do not count."""
    by = defaultdict(lambda: defaultdict(list))
    for path in results_csvs:
        if not (REPO / path).exists():
            continue
        for r in read_csv(REPO / path):
            kernels = r.get("onednn", "")
            if r["status"] == "done" and r["images_per_sec"] and int(r["batch_size"]) == batch \
                    and kernels in KERNELS:
                by[r["optimizer"]][kernels].append(float(r["images_per_sec"]))
    common = next((k for k in KERNELS if all(k in measured for measured in by.values())), None)
    out = {}
    for method, measured in by.items():
        kernels = common if common is not None else next(k for k in KERNELS if k in measured)
        out[method] = (statistics.median(measured[kernels]), KERNELS[kernels])
    return out


def updates_to_target(steps_csv, subset) -> dict:
    """{method: {batch: (mean updates to target, seeds that reached it, seeds run)}} over the
    runs of the setting the steps-to-target table chose (on validation) at each batch."""
    groups = defaultdict(list)
    for r in read_csv(REPO / steps_csv):
        if int(r["subset_seed"]) == subset and r["chosen"] == "True":
            groups[(r["optimizer"], int(r["batch_size"]))].append(r)
    out = defaultdict(dict)
    for (m, b), runs in groups.items():
        hit = [float(r["updates_to_target"]) for r in runs if r["reached"] == "True"]
        if hit:
            out[m][b] = (statistics.fmean(hit), len(hit), len(runs))
    return out


def interpolate(points: dict, batch: int, full_batch: int):
    """U at ``batch`` from {batch: U}, log-log between measured batches; (U, held) where
    held says the full-batch value was held beyond the full training set; None outside."""
    if not points:
        return None
    xs = sorted(points)
    if batch in points:
        return points[batch], False
    if batch > xs[-1]:
        return (points[xs[-1]], True) if xs[-1] >= full_batch else None
    if batch < xs[0]:
        return None
    hi = next(x for x in xs if x > batch)
    lo = max(x for x in xs if x < batch)
    t = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp((1 - t) * math.log(points[lo]) + t * math.log(points[hi])), False


def predict(inputs) -> dict:
    rate = rates(inputs["rates_from"], inputs["rate_batch"])
    u = updates_to_target(inputs["steps_to_target"], inputs["subset_seed"])
    alpha, link = inputs["latency_s"], inputs["bandwidth_bytes_per_s"]
    size = inputs["gradient_bytes"]
    rows = {}
    for m in sorted(set(rate) & set(u)):
        passes = 2 if m in TWO_PASS else 1
        allreduces = 2 if m in TWO_PASS else 1
        per_update_compute = PER_WORKER / rate[m][0]  # a two-pass run's rate already pays both passes
        means = {b: v[0] for b, v in u[m].items()}
        for w in WORKERS:
            found = interpolate(means, PER_WORKER * w, inputs["full_batch"])
            comm = 0.0 if w == 1 else allreduces * (2 * (w - 1) * alpha + 2 * (w - 1) / w * size / link)
            rows[(m, w)] = None if found is None else {
                "updates": found[0], "held": found[1], "compute_s": found[0] * per_update_compute,
                "comm_s": found[0] * comm, "total_s": found[0] * (per_update_compute + comm), "passes": passes}
    return {"rate": rate, "updates": u, "rows": rows}


def table(inputs, result) -> str:
    methods = sorted({m for m, _ in result["rows"]})
    lines = [f"Predicted time to target (s) on W workers x {PER_WORKER} samples (subset_seed "
             f"{inputs['subset_seed']}); * = full-batch updates held beyond the full training set; "
             "– = updates to target not measured at that batch.", "",
             "| W | global batch | " + " | ".join(methods) + " |", "|---:|---:|" + "---:|" * len(methods)]
    for w in WORKERS:
        cells = []
        for m in methods:
            r = result["rows"][(m, w)]
            cells.append("–" if r is None else f"{r['total_s']:,.0f}{'*' if r['held'] else ''} "
                         f"({100 * r['comm_s'] / r['total_s']:.0f} % comm)")
        lines.append(f"| {w} | {PER_WORKER * w} | " + " | ".join(cells) + " |")
    kernels = {k for _, k in result["rate"].values()}
    if len(kernels) == 1:
        rates_text = ", ".join(f"{m} {v:.0f}" for m, (v, _) in sorted(result["rate"].items())) \
            + f" (all on one set of CPU kernels: {kernels.pop()})"
    else:
        rates_text = ", ".join(f"{m} {v:.0f} ({k})" for m, (v, k) in sorted(result["rate"].items())) \
            + " (no one set of CPU kernels ran every method: these rates are not comparable)"
    lines += ["", "Measured inputs: images/s per worker " + rates_text + "; updates to target " + "; ".join(
        f"{m}: " + ", ".join(f"{b} → {v[0]:.0f} ({v[1]}/{v[2]} seeds reached)" for b, v in sorted(pts.items()))
        for m, pts in sorted(result["updates"].items())) + ".",
        f"Assumed: latency {inputs['latency_s'] * 1e6:.0f} µs, bandwidth "
        f"{inputs['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s per link, gradient {inputs['gradient_bytes'] / 1e6:.2f} MB "
        f"({inputs['gradient_bytes_note']})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", default=str(REPO / "benchmarks/scaling_inputs.json"))
    p.add_argument("--out", help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    inputs = json.loads(Path(args.inputs).read_text())
    text = table(inputs, predict(inputs))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
