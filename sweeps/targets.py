"""Steps to target (Shallue et al. 2019, "Measuring the effects of data parallelism"): for
every finished run, the first evaluated update at which validation accuracy reaches a
target, and the gradient evaluations spent by then (updates × passes × samples per update:
a two-pass method pays two per sample). The target is small-batch SGD's: the mean best
validation accuracy of SGD at the smallest batch of a reference report (the batch curve's
SGD@128), per training subset.

    python -m sweeps targets runs/fashion_mnist_price runs/fashion_mnist_batch_curve \
        --target-from docs/results/fashion_mnist_batch_curve --out docs/results/fashion_mnist_price

writes steps_to_target.csv (every run; ``chosen`` marks the table's), steps_to_target.md (the settings each report's
selection chose, per subset, batch and method) and steps_to_target.png (updates to target
against batch, log-log, with the perfect-scaling line through SGD's smallest batch).
Evaluations come every ``train.eval_every`` epochs, so an update to target is known to
that resolution (the table says the step). A run that never reaches the target counts
as not reached, never as its budget.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from hvd_gradalign_base.files import write_csv_atomic, write_text_atomic
from sweeps.report import SETTING_KEYS, collect, passes, select
from sweeps.selection import mean_std
from sweeps.state import read_json
from train.config import typed

COLUMNS = ["id", "subset_seed", "batch_size", "optimizer", "lr", "beta", "epochs", "seed", "target",
           "reached", "epoch_to_target", "updates_to_target", "grad_evals_to_target", "eval_every_updates",
           "best_val_accuracy", "chosen"]


def targets_from(results_csv) -> dict:
    """{subset_seed: target}: SGD's mean best validation accuracy at the smallest batch it
    ran on each subset, read from a report's results.csv (made with --at best_val)."""
    with open(results_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "done" and r["optimizer"] == "sgd"
                and r["val_accuracy"]]
    if not rows:
        raise ValueError(f"{results_csv} has no finished SGD run with a validation accuracy")
    out = {}
    for subset in sorted({int(r["subset_seed"]) for r in rows}):
        mine = [r for r in rows if int(r["subset_seed"]) == subset]
        smallest = min(int(r["batch_size"]) for r in mine)
        # The batch's chosen lr: the best mean validation over its settings.
        by_lr = defaultdict(list)
        for r in mine:
            if int(r["batch_size"]) == smallest:
                by_lr[float(r["lr"])].append(float(r["val_accuracy"]))
        out[subset] = max(statistics.fmean(v) for v in by_lr.values())
    return out


def steps_per_epoch(config) -> int:
    """Updates per epoch: the training samples a run reads over its global batch, the
    remainder dropped (hvd_gradalign.data)."""
    c = typed(config)
    return c.data.train_samples // c.train.batch_size


def to_target(history, target, per_epoch):
    """(epoch, updates) of the first evaluation with validation accuracy >= target, or None."""
    for r in history:
        if r.get("val_accuracy") is not None and r["val_accuracy"] >= target:
            return r["epoch"], r["epoch"] * per_epoch
    return None


def measure(runs_dirs, targets) -> list[dict]:
    """A row per finished run with per-evaluation metrics (table-only restored runs have
    none and are left out): its updates and gradient evaluations to its subset's target."""
    out = []
    for runs_dir in runs_dirs:
        for row in collect(runs_dir, "best_val"):
            run_dir = Path(runs_dir) / row["id"]
            history = read_json(run_dir / "metrics.json")
            config = read_json(run_dir / "config.json")
            if row["status"] != "done" or not history or config is None or row["subset_seed"] not in targets:
                continue
            per_epoch = steps_per_epoch(config)
            target = targets[row["subset_seed"]]
            hit = to_target(history, target, per_epoch)
            evals = [r["epoch"] for r in history if r.get("val_accuracy") is not None]
            out.append({
                **{k: row[k] for k in ("id", "subset_seed", "batch_size", "optimizer", "lr", "beta", "epochs", "seed")},
                "target": target, "reached": hit is not None,
                "epoch_to_target": hit[0] if hit else None, "updates_to_target": hit[1] if hit else None,
                "grad_evals_to_target": hit[1] * passes(row) * row["batch_size"] if hit else None,
                "eval_every_updates": (evals[1] - evals[0]) * per_epoch if len(evals) > 1 else None,
                "best_val_accuracy": max(r["val_accuracy"] for r in history if r.get("val_accuracy") is not None),
                "_row": row,
            })
    return out


def chosen_runs(measured) -> dict:
    """{(subset, batch, method): [measured runs of the setting chosen]}: at each batch and
    method the setting (lr, strength, budget) with the best validation on the first subset
    (sweeps.report.select), applied unchanged to the others."""
    rows = [m["_row"] for m in measured]
    subsets = sorted({r["subset_seed"] for r in rows})
    if not subsets:
        return {}
    chosen = select([r for r in rows if r["subset_seed"] == subsets[0]])
    out = {}
    for subset in subsets:
        for (b, o), (setting, _, _) in chosen.items():
            runs = [m for m in measured if m["subset_seed"] == subset
                    and (m["batch_size"], m["optimizer"]) == (b, o)
                    and tuple(m["_row"][k] for k in SETTING_KEYS) == setting]
            if runs:
                out[(subset, b, o)] = runs
    return out


def _cell(values, digits=0):
    m, s = mean_std(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(values) > 1 else "")


def table(groups, targets) -> str:
    lines = []
    for subset in sorted({s for s, _, _ in groups}):
        lines += [f"### subset_seed {subset}: target {100 * targets[subset]:.2f} % validation accuracy "
                  "(SGD's mean best at its smallest batch)", "",
                  "| global batch | method | setting | reached | updates to target | gradient evaluations "
                  "to target (10⁶) | evaluated every (updates) |", "|---:|---|---|---:|---:|---:|---:|"]
        for (s, b, o), runs in sorted(groups.items()):
            if s != subset:
                continue
            hit = [m for m in runs if m["reached"]]
            r0 = runs[0]
            setting = f"lr={r0['lr']:g}" + ("" if o == "sgd" else f", {'β' if o in ('gradalign', 'grad_penalty') else 'ρ'}={r0['beta']:g}") \
                + f", {r0['epochs']:g} epochs"
            lines.append(f"| {b} | {o} | {setting} | {len(hit)}/{len(runs)} | "
                         f"{_cell([m['updates_to_target'] for m in hit])} | "
                         f"{_cell([m['grad_evals_to_target'] / 1e6 for m in hit], 2)} | "
                         f"{r0['eval_every_updates'] or '–'} |")
        lines.append("")
    lines.append("Updates and gradient evaluations (updates × passes × samples) to the first evaluation at or "
                 "above the target: mean ± std over the seeds that reached it; reached = seeds that did / "
                 "seeds run. Settings: at each batch and method, the best on validation (any budget).")
    return "\n".join(lines) + "\n"


def plot(groups, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = sorted({s for s, _, _ in groups})
    fig, axes = plt.subplots(1, len(subsets), figsize=(5.5 * len(subsets), 4.2), squeeze=False)
    for ax, subset in zip(axes[0], subsets):
        by_method = defaultdict(list)
        for (s, b, o), runs in groups.items():
            hit = [m["updates_to_target"] for m in runs if m["reached"]]
            if s == subset and hit:
                by_method[o].append((b, statistics.fmean(hit), len(hit), len(runs)))
        for o, points in sorted(by_method.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=o)
            for b, u, n, total in points:
                if n < total:
                    ax.annotate(f"{n}/{total}", (b, u), fontsize=7, textcoords="offset points", xytext=(3, 3))
        sgd = sorted(by_method.get("sgd", []))
        if sgd:
            b0, u0 = sgd[0][0], sgd[0][1]
            xs = sorted({b for pts in by_method.values() for b, *_ in pts})
            ax.plot(xs, [u0 * b0 / b for b in xs], "k--", lw=0.8, label="perfect scaling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch")
        ax.set_ylabel("updates to target")
        ax.set_title(f"subset_seed {subset}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) / "steps_to_target.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(runs_dirs, target_from, out) -> dict:
    target_csv = Path(target_from) / "results.csv" if Path(target_from).is_dir() else Path(target_from)
    if not target_csv.exists():
        raise FileNotFoundError(f"{target_csv} does not exist: pass a report folder (or its results.csv) "
                                "holding SGD at a small batch, e.g. docs/results/fashion_mnist_batch_curve")
    targets = targets_from(target_csv)
    measured = measure(runs_dirs, targets)
    if not measured:
        raise FileNotFoundError(f"no finished run with per-evaluation metrics in {', '.join(map(str, runs_dirs))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = chosen_runs(measured)
    chosen_ids = {m["id"] for runs in groups.values() for m in runs}
    for m in measured:
        m["chosen"] = m["id"] in chosen_ids
    write_csv_atomic(out / "steps_to_target.csv", [{k: m[k] for k in COLUMNS} for m in measured], COLUMNS)
    text = table(groups, targets)
    write_text_atomic(out / "steps_to_target.md", text)
    png = plot(groups, out)
    print(text)
    print(f"wrote {out / 'steps_to_target.csv'}, {out / 'steps_to_target.md'}, {png}")
    return {"targets": targets, "measured": measured, "groups": groups, "table": text}
