"""Collect a sweep's points into results.csv, a Markdown table and plots.

Selection: for every (global batch, optimizer) the table shows the setting
(learning rate, β, warmup, ...: every grid value except the seed) with the best
mean final *validation* accuracy over seeds, so that each optimizer, the
large-batch baseline included, is shown at its best, chosen without looking at
the test set. Without a validation split the lowest final training loss decides,
and the table says so.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import tomllib
from collections import defaultdict
from pathlib import Path

from hvd_gradalign.checkpoint import write_text_atomic
from sweeps.state import point_state, read_json

COLUMNS = ["id", "status", "dataset", "model", "optimizer", "inner", "batch_size", "workers_micro",
           "lr", "lr_scaling", "warmup_epochs", "beta", "seed", "epochs", "epochs_done",
           "train_accuracy", "train_loss", "val_accuracy", "test_accuracy", "test_loss",
           "grad_variance", "grad_variance_ratio", "images_per_sec", "wall_time"]
SETTING_KEYS = ("lr", "lr_scaling", "warmup_epochs", "beta")


def collect(runs_dir) -> list[dict]:
    rows = []
    for run_dir in sorted(p for p in Path(runs_dir).iterdir()
                          if (p / "config.json").exists() or (p / "point.toml").exists()):
        # A point that failed before training wrote no config.json; its launcher's
        # point.toml still says what it was.
        config = read_json(run_dir / "config.json") or tomllib.loads((run_dir / "point.toml").read_text())
        summary = read_json(run_dir / "summary.json") or {}
        history = read_json(run_dir / "metrics.json") or []
        final = history[-1] if history else {}
        o, t, d = config["optim"], config["train"], config["data"]
        ips = [r["images_per_sec"] for r in history if "images_per_sec" in r]
        rows.append({
            "id": run_dir.name, "status": point_state(run_dir), "dataset": d["dataset"],
            "model": config["model"]["model"], "optimizer": o["optimizer"], "inner": o["inner"],
            "batch_size": t["batch_size"], "workers_micro": o["micro_batches"], "lr": o["lr"],
            "lr_scaling": o["lr_scaling"], "warmup_epochs": o["warmup_epochs"], "beta": o["beta"],
            "seed": t["seed"], "epochs": t["epochs"], "epochs_done": len(history),
            "train_accuracy": final.get("accuracy"), "train_loss": final.get("loss"),
            "val_accuracy": final.get("val_accuracy"), "test_accuracy": final.get("test_accuracy"),
            "test_loss": final.get("test_loss"), "grad_variance": final.get("grad_variance"),
            "grad_variance_ratio": final.get("grad_variance_ratio"),
            "images_per_sec": statistics.median(ips) if ips else None,
            "wall_time": final.get("wall_time"),
        })
        if summary.get("status") == "diverged":
            rows[-1]["status"] = "diverged"
    return rows


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def select(rows):
    """{(batch, optimizer): (setting, [rows of its seeds], criterion)} over finished points."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "done":
            groups[(r["batch_size"], r["optimizer"])][tuple(r[k] for k in SETTING_KEYS)].append(r)
    chosen = {}
    for key, settings in groups.items():
        has_val = all(r["val_accuracy"] is not None for rs in settings.values() for r in rs)
        if has_val:
            best = max(settings, key=lambda s: _mean_std([r["val_accuracy"] for r in settings[s]])[0])
            chosen[key] = (best, settings[best], "validation accuracy")
        else:
            best = min(settings, key=lambda s: _mean_std([r["train_loss"] for r in settings[s]])[0])
            chosen[key] = (best, settings[best], "training loss (no validation split)")
    return chosen


def markdown_table(rows, chosen) -> str:
    batches = sorted({b for b, _ in chosen})
    optimizers = sorted({o for _, o in chosen})
    criteria = sorted({c for _, _, c in chosen.values()})
    lines = ["| global batch | " + " | ".join(optimizers) + " |",
             "|---:|" + "---|" * len(optimizers)]
    for b in batches:
        cells = []
        for o in optimizers:
            if (b, o) not in chosen:
                cells.append("–")
                continue
            setting, seeds, _ = chosen[(b, o)]
            test_m, test_s = _mean_std([r["test_accuracy"] for r in seeds])
            gap_m, _ = _mean_std([r["train_accuracy"] - r["test_accuracy"] for r in seeds
                                  if r["train_accuracy"] is not None and r["test_accuracy"] is not None])
            s = dict(zip(SETTING_KEYS, setting))
            beta = f", β={s['beta']:g}" if o == "gradalign" else ""
            cells.append(f"{100 * test_m:.2f} ± {100 * test_s:.2f} (gap {100 * gap_m:+.2f}; "
                         f"lr={s['lr']:g}{beta}, warmup {s['warmup_epochs']:g}, n={len(seeds)})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] != "done"]
    notes = [
        "",
        "Cells: final test accuracy (%) mean ± std over seeds; gap = train − test accuracy "
        "(percentage points); the setting shown is the one selected by " + " / ".join(criteria) + ".",
    ]
    if failed:
        notes.append(f"Not in the table: {len(failed)} point(s) not finished "
                     f"({', '.join(sorted({r['status'] for r in failed}))}); see results.csv.")
    return "\n".join(lines + notes) + "\n"


def plots(rows, chosen, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = [("test_accuracy", "final test accuracy", "test_accuracy_vs_batch.png", 100.0),
              ("grad_variance", "gradient variance V (final epoch)", "grad_variance_vs_batch.png", 1.0),
              ("images_per_sec", "images / s (median epoch)", "throughput_vs_batch.png", 1.0)]
    optimizers = sorted({o for _, o in chosen})
    for key, label, name, scale in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for o in optimizers:
            xs, ms, ss = [], [], []
            for (b, oo), (_, seeds, _) in sorted(chosen.items()):
                if oo != o:
                    continue
                m, s = _mean_std([r[key] for r in seeds])
                if m is not None:
                    xs.append(b)
                    ms.append(m * scale)
                    ss.append(s * scale)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=o)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_ylabel(label + (" (%)" if scale == 100.0 else ""))
        if key == "grad_variance":
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(out / name)
    return files


def report(runs_dir, out=None) -> dict:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir} is not a folder of sweep runs")
    out = Path(out) if out else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(runs_dir)
    if not rows:
        raise FileNotFoundError(f"no runs (folders with config.json or point.toml) in {runs_dir}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buf.getvalue())
    chosen = select(rows)
    table = markdown_table(rows, chosen) if chosen else "No finished points yet.\n"
    write_text_atomic(out / "table.md", table)
    files = plots(rows, chosen, out) if chosen else []
    print(table)
    print(f"wrote {out / 'results.csv'}, {out / 'table.md'}" + "".join(f", {f}" for f in files))
    return {"rows": rows, "chosen": chosen, "table": table, "plots": files}
