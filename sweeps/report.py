"""Collect a sweep's points into results.csv, a Markdown table and plots.

Which epoch of a run counts: ``at="final"`` (the last epoch), ``at="best_val"``
(the evaluated epoch with the highest validation accuracy, i.e. early stopping
on validation) or ``at="last_mean"`` (the metrics averaged over the last
evaluations). Test numbers are always read there, never chosen on.

Selection: for every (global batch, optimizer) the table shows the setting
(learning rate, β, warmup, ...: every grid value except the seed) with the best
*validation* accuracy, so that each optimizer, the large-batch baseline
included, is shown at its best, chosen without looking at the test set. Settings
are compared on the mean over the seeds they all have (a sweep may tune on one
seed and then run the chosen setting on more); on an exact tie the smaller setting
wins, compared value by value in SETTING_KEYS order (lr, lr_scaling, warmup, β,
epochs). Without a validation split the lowest training loss decides, and the table
says so.

Budgets: a batch whose budget was raised or piloted has finished runs of one setting at
several budgets, the shorter a prefix of the longer (sweeps/extend.py). They are never
seeds of one setting, and settings are compared at one budget per batch: the one most
of the batch's finished runs have (the larger on a tie). Runs at the batch's other
budgets stay in results.csv, and the table counts them.
"""

from __future__ import annotations

import math
import statistics
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

from hvd_gradalign_base.files import write_csv_atomic, write_text_atomic
from sweeps import archive, markdown
from sweeps.selection import AT, best_setting, mean_pm, mean_std, paired_differences, pick_epoch, reading
from sweeps.state import point_state, provenance, read_json, run_dirs
from train.config import budget, is_federated, typed

COLUMNS = ["id", "status", "dataset", "model", "optimizer", "inner", "batch_size", "workers",
           "micro_batches", "micro_batch_size", "lr", "lr_scaling", "warmup_epochs", "beta", "seed",
           "epochs", "epochs_done", "epoch", "train_accuracy", "train_loss", "val_accuracy",
           "test_accuracy", "test_loss", "grad_variance", "grad_variance_ratio", "images_per_sec",
           "wall_time", "train_samples", "subset_seed", "warmup_from", "train_accuracy_from",
           "continued_from", "own_wall_time", "onednn"]
SETTING_KEYS = ("lr", "lr_scaling", "warmup_epochs", "beta", "epochs")


def _micro(config, workers):
    """(micro-batches per worker, samples per micro-batch) that the point ran."""
    c = typed(config)
    o, local = c.optim, c.train.batch_size // max(workers or 1, 1)
    if o.micro_batch_size:
        return local // o.micro_batch_size, o.micro_batch_size
    return o.micro_batches, local // o.micro_batches


def method(optim) -> str:
    """The method a run's [optim] section describes, as results tables name it:
    optim.optimizer, with SAM's forms told apart (sam = per micro-batch, sam_global; an "a"
    for adaptive)."""
    if optim.optimizer != "sam":
        return optim.optimizer
    return ("asam" if optim.sam_adaptive else "sam") + ("_global" if optim.sam_scope == "global" else "")


def strength(optim) -> float:
    """The two-pass displacement's strength (the results' "beta" column): GradAlign's and the
    penalty's β, SAM's ρ."""
    return optim.rho if optim.optimizer == "sam" else optim.beta


STRENGTH_SYMBOL = {"gradalign": "β", "grad_penalty": "β"}  # any SAM form: ρ


def _config_fields(config) -> dict:
    """The columns a run's config decides."""
    c = typed(config)
    o, t, d = c.optim, c.train, c.data
    return {"dataset": d.dataset, "model": c.model.model, "optimizer": method(o),
            "inner": o.inner, "batch_size": t.batch_size, "lr": o.lr, "lr_scaling": o.lr_scaling,
            "warmup_epochs": o.warmup_epochs, "beta": strength(o), "seed": t.seed, "epochs": t.epochs,
            "train_samples": d.train_samples, "subset_seed": d.subset_seed,
            "warmup_from": o.warmup_from if o.warmup_epochs else ""}


def pending_row(point_id, config, workers) -> dict:
    """A row for a point of the spec that has not started (no run folder yet)."""
    return {**dict.fromkeys(COLUMNS), **_config_fields(config), "id": point_id, "status": "pending",
            "workers": workers, "epochs_done": 0}


def collect(runs_dir, at="final") -> list[dict]:
    if at not in AT:
        raise ValueError(f"at={at!r}: choose one of {AT}")
    rows = []
    for run_dir in [p for p in run_dirs(runs_dir)
                    if (p / "config.json").exists() or (p / "point.toml").exists()]:
        # A point that failed before training wrote no config.json; its launcher's
        # point.toml still says what it was.
        planned = tomllib.loads((run_dir / "point.toml").read_text()) if (run_dir / "point.toml").exists() else None
        config = read_json(run_dir / "config.json") or planned
        restored = archive.restored_result(run_dir, at, COLUMNS, config)
        if restored is not None:
            rows.append(restored)
            continue
        summary = read_json(run_dir / "summary.json") or {}
        launcher = read_json(run_dir / "launcher.json") or {}
        history = read_json(run_dir / "metrics.json") or []
        row = pick_epoch(history, at)
        workers = summary.get("workers") or launcher.get("workers")
        micro, micro_size = _micro(config, workers) if workers else (None, None)
        ips = [r["images_per_sec"] for r in history if "images_per_sec" in r]
        # A clean train accuracy (train_eval_*) when the run evaluated the training
        # set; otherwise Keras' running mean over the epoch.
        train_acc = row.get("train_eval_accuracy", row.get("accuracy"))
        train_loss = row.get("train_eval_loss", row.get("loss"))
        wall_time = history[-1].get("wall_time") if history else None
        rows.append({
            **_config_fields(config), "id": run_dir.name,
            "status": point_state(run_dir, wanted=budget(planned or config)), "workers": workers,
            "micro_batches": micro, "micro_batch_size": micro_size, "epochs_done": len(history),
            "epoch": row.get("epoch"), "train_accuracy": train_acc, "train_loss": train_loss,
            "val_accuracy": row.get("val_accuracy"), "test_accuracy": row.get("test_accuracy"),
            "test_loss": row.get("test_loss"), "grad_variance": row.get("grad_variance"),
            "grad_variance_ratio": row.get("grad_variance_ratio"),
            "images_per_sec": statistics.median(ips) if ips else None,
            "wall_time": wall_time,
            "train_accuracy_from": "evaluation" if "train_eval_accuracy" in row else "running mean",
            **provenance(run_dir, wall_time),
        })
        if summary.get("status") == "diverged":
            rows[-1]["status"] = "diverged"
    return rows


def passes(row) -> int:
    """Gradient passes per sample and update: 2 for a two-pass method (GradAlign, SAM, the
    penalty) with a strength > 0, 1 for data-parallel SGD (whose V log costs no pass)."""
    return 1 if row["optimizer"] == "sgd" or not row["beta"] else 2


def _budget(row, equal_cost):
    return row["epochs"] * (passes(row) if equal_cost else 1)


def batch_budgets(rows, equal_cost=False) -> dict:
    """{batch: budget}: the budget each batch is read at (see the module's docstring), in
    epochs, or with ``equal_cost`` in gradient passes per sample (epochs × passes), so that
    SGD at twice the epochs is read beside a two-pass method at its budget."""
    counts = defaultdict(Counter)
    for r in rows:
        if r["status"] == "done":
            counts[r["batch_size"]][_budget(r, equal_cost)] += 1
    return {b: max(c, key=lambda budget: (c[budget], budget)) for b, c in counts.items()}


def at_batch_budget(rows, equal_cost=False) -> tuple[list, list]:
    """(the rows the tables read, the finished runs at another budget of their batch)."""
    budgets = batch_budgets(rows, equal_cost)
    other = [r for r in rows if r["status"] == "done"
             and _budget(r, equal_cost) != budgets[r["batch_size"]]]
    return [r for r in rows if r not in other], other  # rows are dicts with distinct ids


def _other_budgets_note(other, equal_cost=False) -> str:
    if not other:
        return ""
    counts = Counter((r["batch_size"], r["optimizer"] if equal_cost else "", r["epochs"]) for r in other)
    what = "; ".join(f"batch {b}: {n}{' ' + o if o else ''} at {e} epochs"
                     for (b, o, e), n in sorted(counts.items()))
    return (f"\nRead at one budget per batch (the one most of its finished runs have); not in the "
            f"tables: {len(other)} finished run(s) at another budget ({what}); see results.csv.\n")


def _groups(rows):
    """{(batch, optimizer): {setting: [rows of its seeds]}} over finished points."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "done":
            groups[(r["batch_size"], r["optimizer"])][tuple(r[k] for k in SETTING_KEYS)].append(r)
    return groups


def select(rows):
    """{(batch, optimizer): (setting, [rows of its seeds], criterion)} over finished points."""
    chosen = {}
    for key, settings in _groups(rows).items():
        has_val = all(r["val_accuracy"] is not None for rs in settings.values() for r in rs)
        if has_val:
            best = best_setting(settings, "val_accuracy", max)
            chosen[key] = (best, settings[best], "validation accuracy")
        else:
            best = best_setting(settings, "train_loss", min)
            chosen[key] = (best, settings[best], "training loss (no validation split)")
    return chosen


def apply_choice(rows, chosen, subset):
    """The settings ``chosen`` (on another subset) with this subset's finished seeds."""
    out = {}
    for (b, o), (setting, _, criterion) in chosen.items():
        seeds = [r for r in rows if r["status"] == "done" and r["subset_seed"] == subset
                 and (r["batch_size"], r["optimizer"]) == (b, o)
                 and tuple(r[k] for k in SETTING_KEYS) == setting]
        if seeds:
            out[(b, o)] = (setting, seeds, criterion)
    return out


def _grad_variance(r):
    """V, where it means something: over a single micro-batch (one worker, m = 1) the mean
    is that micro-batch's gradient and V is rounding error, which a log axis would draw
    as a value many decades below the others. A row that does not say its layout keeps V."""
    if r.get("workers") == 1 and r.get("micro_batches") == 1:
        return None
    return r["grad_variance"]


def _gap(r):
    """train − test accuracy, from a clean evaluation of the training set only: Keras'
    running mean over an epoch trails the model and would make the gap look negative."""
    if (r["train_accuracy"] is None or r["test_accuracy"] is None
            or r.get("train_accuracy_from") != "evaluation"):
        return None
    return r["train_accuracy"] - r["test_accuracy"]


def markdown_table(rows, chosen, at="final") -> str:
    batches = sorted({b for b, _ in chosen})
    optimizers = sorted({o for _, o in chosen})
    criteria = sorted({c for _, _, c in chosen.values()})

    def cell(b, o):
        if (b, o) not in chosen:
            return None
        setting, seeds, _ = chosen[(b, o)]
        gap_m, _ = mean_std([_gap(r) for r in seeds])
        train_m, _ = mean_std([r["train_accuracy"] for r in seeds if _gap(r) is not None])
        s = dict(zip(SETTING_KEYS, setting))
        beta = "" if o == "sgd" else f", {STRENGTH_SYMBOL.get(o, 'ρ')}={s['beta']:g}"
        gap = f"train {100 * train_m:.2f}, gap {100 * gap_m:+.2f}; " if gap_m is not None else ""
        return (f"{mean_pm([r['test_accuracy'] for r in seeds])} ({gap}"
                f"lr={s['lr']:g}{beta}, warmup {s['warmup_epochs']:g}, {s['epochs']:g} epochs, n={len(seeds)})")

    lines = markdown.grid("global batch", batches, optimizers, cell, right={0})
    failed = [r for r in rows if r["status"] != "done"]
    notes = [
        "",
        f"Cells: test accuracy (%) {reading(at, 'epoch')}, mean ± std over seeds; train = training "
        "accuracy (%, a clean evaluation of the training set) at that epoch, gap = train − test "
        "accuracy (percentage points); the setting shown is the one selected by "
        + " / ".join(criteria) + ".",
    ]
    if failed:
        notes.append(f"Not in the table: {len(failed)} point(s) not finished "
                     f"({', '.join(sorted({r['status'] for r in failed}))}); see results.csv.")
    return "\n".join(lines + notes) + "\n"


def recovery_table(chosen) -> str:
    """GradAlign against SGD at each batch, and the share of the small-vs-large
    batch gap that GradAlign wins back (the reference is SGD at the smallest batch)."""
    sgd = {b: seeds for (b, o), (_, seeds, _) in chosen.items() if o == "sgd"}
    ga = {b: seeds for (b, o), (_, seeds, _) in chosen.items() if o == "gradalign"}
    if not sgd:
        return ""
    small = min(sgd)
    ref, _ = mean_std([r["test_accuracy"] for r in sgd[small]])
    lines = [f"| global batch | SGD | GradAlign | GradAlign − SGD (± SE) | gap to SGD@{small} recovered |",
             "|---:|---|---|---:|---:|"]
    for b in sorted(set(sgd) | set(ga)):
        s_m, s_s, s_n = _test_stats(sgd.get(b, []))
        g_m, g_s, g_n = _test_stats(ga.get(b, []))
        cell = lambda runs, m: "–" if m is None else f"{mean_pm([r['test_accuracy'] for r in runs])} (n={len(runs)})"
        diff = _difference((s_m, s_s, s_n), (g_m, g_s, g_n))
        lost = (ref - s_m) if s_m is not None else None
        if g_m is None or lost is None or b == small:
            recovered = "–"
        elif lost <= 0:
            recovered = "no gap"
        else:
            recovered = f"{100 * (g_m - s_m) / lost:.0f} %"
        lines.append(f"| {b} | {cell(sgd.get(b, []), s_m)} | {cell(ga.get(b, []), g_m)} | {diff} | {recovered} |")
    return "\n".join(lines) + "\n"


def against_gradalign(choices) -> str:
    """Every other method at its chosen setting against GradAlign at its own, batch by batch:
    GradAlign − method in test points, paired by (subset, seed): a pair shares its data,
    initial weights and data order, so the seed's luck cancels. ``choices``: one ``select``
    or ``apply_choice`` result per subset; several subsets pool their pairs.

    Columns: mean ± standard error of the paired differences (std/√n), the number of pairs,
    how many of them GradAlign is ahead in, and whether the mean is more than 2 standard
    errors from 0. That verdict needs 3 pairs or more: from 2 the standard error is itself
    too uncertain to lean on."""
    def tests(seeds):
        return {(r["subset_seed"], r["seed"]): r["test_accuracy"] for r in seeds}

    by_key = defaultdict(dict)
    for chosen in choices:
        for (b, o), (_, seeds, _) in chosen.items():
            by_key[(b, o)].update(tests(seeds))
    lines = []
    for (b, o), mine in sorted(by_key.items()):
        if o == "gradalign" or (b, "gradalign") not in by_key:
            continue
        diffs = paired_differences(mine, by_key[(b, "gradalign")])
        if not diffs:
            continue
        m, s = mean_std(diffs)
        n = len(diffs)
        se = s / math.sqrt(n) if n > 1 else None
        cell = f"{m:+.2f}" + (f" ± {se:.2f}" if se is not None else "")
        verdict = "–" if n < 3 else ("yes" if abs(m) > 2 * se else "no")
        ahead = sum(d > 0 for d in diffs)
        lines.append(f"| {b} | {o} | {cell} | {n} | {ahead} of {n} | {verdict} |")
    if not lines:
        return ""
    return "\n".join(["| global batch | method | GradAlign − method (± SE) | pairs | GradAlign ahead "
                      "| beyond 2 SE |", "|---:|---|---:|---:|---:|---|", *lines]) + "\n"


def _test_stats(runs):
    """(mean, std, n) of the runs' test accuracies, n counting the values mean_std uses."""
    values = [r["test_accuracy"] for r in runs]
    return (*mean_std(values), sum(v is not None and math.isfinite(v) for v in values))


def _difference(sgd, ga) -> str:
    """GradAlign's mean minus SGD's (each a ``_test_stats``), in points, with the standard
    error of that difference (independent runs: √(s²_GA/n_GA + s²_SGD/n_SGD)) once both
    have 2 seeds or more."""
    (s_m, s_s, n_s), (g_m, g_s, n_g) = sgd, ga
    if s_m is None or g_m is None:
        return "–"
    if min(n_s, n_g) < 2:
        return f"{100 * (g_m - s_m):+.2f}"
    return f"{100 * (g_m - s_m):+.2f} ± {100 * math.sqrt(g_s ** 2 / n_g + s_s ** 2 / n_s):.2f}"


def _errorbar(ax, chosen, optimizer, key, scale, color=None):
    xs, ms, ss = [], [], []
    for (b, o), (_, seeds, _) in sorted(chosen.items()):
        if o != optimizer:
            continue
        m, s = mean_std([key(r) for r in seeds])
        if m is not None:
            xs.append(b)
            ms.append(m * scale)
            ss.append(s * scale)
    if xs:
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=optimizer, color=color)


def plots(rows, by_subset, out: Path) -> list[Path]:
    """The curves against batch size, one panel per training subset side by side
    (``by_subset``: [(subset_seed, chosen)], the subset the settings were chosen on
    first), on a shared y axis so that a reader sees at once whether what holds on the
    subset the choices were made on also holds on one that played no part in them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = [(lambda r: r["test_accuracy"], "test accuracy", "test_accuracy_vs_batch.png", 100.0),
              (_gap, "train − test accuracy", "gap_vs_batch.png", 100.0),
              (_grad_variance, "gradient variance V", "grad_variance_vs_batch.png", 1.0),
              (lambda r: r["images_per_sec"], "images / s (median epoch)", "throughput_vs_batch.png", 1.0)]
    # one colour per optimizer in every panel, whichever optimizers a subset has
    colors = {o: f"C{i}" for i, o in enumerate(sorted({o for _, chosen in by_subset for _, o in chosen}))}
    for key, label, name, scale in panels:
        fig, axes = plt.subplots(1, len(by_subset), figsize=(6 * len(by_subset), 4), sharex=True, sharey=True,
                                 squeeze=False)
        for i, (ax, (subset, chosen)) in enumerate(zip(axes[0], by_subset)):
            for o in sorted({o for _, o in chosen}):
                _errorbar(ax, chosen, o, key, scale, colors[o])
            sgd_batches = [b for b, o in chosen if o == "sgd"]
            if name == "test_accuracy_vs_batch.png" and sgd_batches:
                small = min(sgd_batches)
                m, s = mean_std([r["test_accuracy"] for r in chosen[(small, "sgd")][1]])
                ax.axhline(100 * m, color="grey", ls="--", label=f"SGD at batch {small}")
                ax.axhspan(100 * (m - s), 100 * (m + s), color="grey", alpha=0.15)
            if len(by_subset) > 1:
                ax.set_title(f"subset_seed {subset} " + ("(settings chosen here)" if i == 0
                                                         else f"(settings from subset_seed {by_subset[0][0]})"))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("global batch size")
            if i == 0:
                ax.set_ylabel(label + (" (%)" if scale == 100.0 else ""))
            if name == "grad_variance_vs_batch.png":
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a panel with no measured value has nothing to name
                ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(out / name)
    beta_plot = _beta_curve(rows, by_subset[0][1], out, plt)
    return files + ([beta_plot] if beta_plot else [])


def _beta_curve(rows, chosen, out, plt):
    """Test and validation accuracy against β at every batch where GradAlign ran, at the
    learning rate selected for GradAlign there; β = 0 is the SGD point at that rate."""
    ga_batches = sorted(b for b, o in chosen if o == "gradalign")
    panels = []
    for b in ga_batches:
        setting = dict(zip(SETTING_KEYS, chosen[(b, "gradalign")][0]))
        same = lambda r: (r["batch_size"] == b and r["status"] == "done" and r["lr"] == setting["lr"]
                          and r["warmup_epochs"] == setting["warmup_epochs"] and r["epochs"] == setting["epochs"]
                          and r["subset_seed"] == chosen[(b, "gradalign")][1][0]["subset_seed"])
        by_beta = defaultdict(list)
        for r in rows:
            if same(r) and r["optimizer"] in ("gradalign", "sgd"):
                by_beta[r["beta"] if r["optimizer"] == "gradalign" else 0.0].append(r)
        if len(by_beta) >= 2:
            panels.append((b, setting, by_beta))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (b, setting, by_beta) in zip(axes[0], panels):
        betas = sorted(by_beta)
        for key, label in (("test_accuracy", "test"), ("val_accuracy", "validation")):
            stats = [mean_std([r[key] for r in by_beta[x]]) for x in betas]
            if all(m is None for m, _ in stats):
                continue
            ax.errorbar(betas, [100 * m if m is not None else math.nan for m, _ in stats],
                        yerr=[100 * s if s is not None else 0 for _, s in stats],
                        marker="o", capsize=3, label=label)
        for x in betas:
            ax.annotate(f"n={len(by_beta[x])}", (x, ax.get_ylim()[0]), fontsize=7, ha="center", va="bottom")
        ax.set_xscale("symlog", linthresh=min(x for x in betas if x > 0))
        ax.set_xlabel(f"β (batch {b}, lr {setting['lr']:g}; β = 0 is SGD)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "accuracy_vs_beta.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(runs_dir, out=None, at="final", header="", pending=(), checkpoints=False,
           equal_cost=False) -> dict:
    """``pending``: rows (pending_row) for points of the spec that have no folder yet;
    ``checkpoints``: park interrupted runs in ``out`` too (sweeps/archive.py);
    ``equal_cost``: read every batch at one budget of gradient passes, not epochs."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir} is not a folder of sweep runs")
    out = Path(out) if out else runs_dir
    in_place = out.resolve() == runs_dir.resolve()
    if checkpoints and in_place:
        raise ValueError("checkpoints are parked in a report written to a folder of its own: pass --out "
                         "(e.g. docs/results/<sweep>), or drop --checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    if not in_place:
        # A report published elsewhere carries the records it was made from (sweeps/archive.py).
        archive.save(runs_dir, out, checkpoints=checkpoints)
    from sweeps import federated_report

    started = [p for p in run_dirs(runs_dir) if (p / "config.json").exists()]
    if started and all(is_federated(read_json(p / "config.json")) for p in started):
        return federated_report.report(started, out, at, header=header)
    every_run = collect(runs_dir, at)
    if not every_run and not pending:
        raise FileNotFoundError(f"no runs (folders with config.json or point.toml) in {runs_dir}")
    write_csv_atomic(out / "results.csv", every_run + list(pending), COLUMNS)
    rows, other_budget = at_batch_budget(every_run, equal_cost)
    # Several training subsets (data.subset_seed): settings are chosen on the first and
    # applied unchanged to the others, which play no part in any choice.
    subsets = sorted({r["subset_seed"] for r in rows})
    chosen = select([r for r in rows if r["subset_seed"] == subsets[0]])
    table = markdown_table(rows, chosen, at) if chosen else "No finished points yet.\n"
    recovery = recovery_table(chosen) if chosen else ""
    paired = against_gradalign([chosen]) if chosen else ""
    by_subset = [(subsets[0], chosen)] if chosen else []
    if len(subsets) > 1:
        table = f"### subset_seed {subsets[0]} (every setting chosen here)\n\n" + table
        recovery = f"subset_seed {subsets[0]}:\n\n" + recovery if recovery else ""
        paired = f"subset_seed {subsets[0]} (where the settings were chosen):\n\n" + paired if paired else ""
        for subset in subsets[1:]:
            applied = apply_choice(rows, chosen, subset)
            table += (f"\n### subset_seed {subset} (the settings chosen on subset_seed {subsets[0]})\n\n"
                      + (markdown_table(rows, applied, at) if applied else "No finished points yet.\n"))
            if applied:
                recovery += f"\nsubset_seed {subset}:\n\n" + recovery_table(applied)
                part = against_gradalign([applied])
                paired += f"\nsubset_seed {subset} (no part in any choice):\n\n" + part if part else ""
                by_subset.append((subset, applied))
        pooled = against_gradalign([c for _, c in by_subset]) if len(by_subset) > 1 else ""
        paired += "\nAll subsets, pairs pooled:\n\n" + pooled if pooled else ""
    if paired:
        paired = ("GradAlign against each method at its chosen setting, paired by subset and seed "
                  "(test accuracy points):\n\n" + paired)
    per = defaultdict(list)
    for r in every_run:
        if r["status"] == "done" and r["wall_time"]:
            per[(r["batch_size"], r["optimizer"])].append(r["wall_time"])
    walls = [w for v in per.values() for w in v]
    own = sum(r["own_wall_time"] for r in every_run if r["status"] == "done" and r["wall_time"])
    timing = ""
    if walls:
        timing = ("\nWall time per finished point (s, median): "
                  + "; ".join(f"batch {b} {o} {statistics.median(v):.0f}"
                              for (b, o), v in sorted(per.items()))
                  + f". Total over {len(walls)} points: {own / 3600:.2f} h"
                  + (" (a continued run counts only its own part)" if own < sum(walls) else "") + ".\n")
    cost_note = ("\nEqual cost: every batch is read at one budget of gradient passes per sample "
                 "(epochs × 2 for a two-pass method, × 1 for SGD).\n") if equal_cost else ""
    text = (header + table + cost_note + _other_budgets_note(other_budget, equal_cost) + archive.restored_note(run_dirs(runs_dir))
            + ("\n" + recovery if recovery else "") + ("\n" + paired if paired else "") + timing)
    write_text_atomic(out / "table.md", text)
    files = plots(rows, by_subset, out) if by_subset else []
    print(text)
    print(f"wrote {out / 'results.csv'}, {out / 'table.md'}" + "".join(f", {f}" for f in files))
    return {"rows": rows, "chosen": chosen, "table": text, "plots": files}
