"""The report of a federated sweep: algorithm × client split, test accuracy at the
final (best-validation, or averaged over the last) evaluated round(s), the setting (lr, β, μ) chosen on
validation accuracy over the seeds all settings share, and, per split, test accuracy
against communication rounds beside the clients' gradient variance V at x (what FedGA
acts on) against rounds."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from hvd_gradalign_base.files import write_csv_atomic, write_text_atomic
from sweeps import markdown
from sweeps.archive import restored_note, restored_result
from sweeps.selection import TAIL, best_setting, mean_pm, mean_std, paired_differences, pick_epoch, reading
from sweeps.state import point_state, provenance, read_json
from train.config import budget, is_federated, typed
from hvd_gradalign_base.federated_settings import GRADIENTS_AT_X, ROUND_COST

COLUMNS = ["id", "status", "algorithm", "split", "lr", "beta", "mu", "seed", "rounds", "rounds_done",
           "round", "train_loss", "val_accuracy", "test_accuracy", "grad_variance", "wall_time",
           "continued_from", "own_wall_time", "onednn"]
SETTING_KEYS = ("lr", "beta", "mu")


def _split_name(f):
    if f.split == "dirichlet":
        return f"dirichlet({f.alpha:g})"
    if f.split == "shards":
        return f"shards×{f.shards_per_client}"
    return "iid"


def collect(run_dirs, at="final"):
    rows, curves = [], {}
    for run_dir in run_dirs:
        config = read_json(run_dir / "config.json")
        if config is None or not is_federated(config):
            continue
        restored = restored_result(run_dir, at, COLUMNS, config)
        if restored is not None:
            rows.append(restored)
            curves[run_dir.name] = {"accuracy": [], "variance": [], "history": []}
            continue
        history = read_json(run_dir / "metrics.json") or []
        summary = read_json(run_dir / "summary.json") or {}
        c = typed(config)
        f, o = c.federated, c.optim
        row = pick_epoch(history, at)
        wall_time = history[-1].get("wall_time") if history else None
        rows.append({
            "id": run_dir.name, "status": point_state(run_dir, wanted=budget(config)), "algorithm": f.algorithm,
            "split": _split_name(f), "lr": o.lr,
            "beta": o.beta if f.algorithm in GRADIENTS_AT_X else 0.0,
            "mu": f.mu if f.algorithm == "fedprox" else 0.0, "seed": c.train.seed,
            "rounds": f.rounds, "rounds_done": summary.get("rounds_done", len(history)),
            "round": row.get("round"), "train_loss": row.get("train_loss"),
            "val_accuracy": row.get("val_accuracy"), "test_accuracy": row.get("test_accuracy"),
            "grad_variance": row.get("grad_variance"),
            "wall_time": wall_time,
            **provenance(run_dir, wall_time),
        })
        curves[run_dir.name] = {
            "accuracy": [(r["communications"], r["test_accuracy"]) for r in history
                         if r.get("test_accuracy") is not None],
            "variance": [(r["round"], r["grad_variance"]) for r in history
                         if r.get("grad_variance") is not None],
            "history": history}
    return rows, curves


def report(run_dirs, out: Path, at="final", header="") -> dict:
    rows, curves = collect(run_dirs, at)
    write_csv_atomic(out / "results.csv", rows, COLUMNS)
    groups = defaultdict(lambda: defaultdict(list))
    shortest = min((r["rounds"] for r in rows), default=None)
    for r in rows:
        if r["status"] == "done":
            groups[(_cell(r, shortest), r["algorithm"])][tuple(r[k] for k in SETTING_KEYS)].append(r)
    chosen = {key: (best, settings[best]) for key, settings in groups.items()
              for best in [best_setting(settings, "val_accuracy", max)]}
    splits = sorted({s for s, _ in chosen})
    algorithms = sorted({a for _, a in chosen})

    def cell(split, a):
        if (split, a) not in chosen:
            return None
        setting, seeds = chosen[(split, a)]
        tests = [r["test_accuracy"] for r in seeds]
        return None if mean_std(tests)[0] is None else f"{mean_pm(tests)} ({_setting_label(setting)}, n={len(seeds)})"

    lines = markdown.grid("split", splits, algorithms, cell)
    lines += _against_fedavg(chosen, splits, algorithms)
    lines += _round_costs(algorithms)
    for measure in EQUAL_COST:
        lines += _at_equal_cost(chosen, curves, splits, algorithms, at, measure)
    lines += _trend(chosen, curves, splits, algorithms)
    lines += _curves_left_out(chosen, curves)
    timed = [r for r in rows if r["status"] == "done" and r["wall_time"]]
    walls = [r["wall_time"] for r in timed]
    own = sum(r["own_wall_time"] for r in timed)
    lines += ["", f"Cells: test accuracy (%) {reading(at, 'evaluated round')}, mean ± std over seeds; "
              "the setting is chosen on validation accuracy."]
    if walls:
        per = defaultdict(list)
        for r in timed:
            per[(r["algorithm"], r["rounds"])].append(r["wall_time"])
        horizons = len({rounds for _, rounds in per}) > 1
        per_algorithm = ", ".join(f"{a}{f' at {n} rounds' if horizons else ''} {statistics.median(w):.0f} s"
                                  for (a, n), w in sorted(per.items()))
        lines.append(f"Wall time per run (median): {per_algorithm}; total "
                     f"{own / 3600:.2f} h over {len(walls)} runs"
                     + (" (a continued run counts only its own part)" if own < sum(walls) else "") + ".")
    note = restored_note(run_dirs)
    if note:
        lines.append(note.strip())
    not_done = [r for r in rows if r["status"] != "done"]
    if not_done:
        lines.append(f"Not in the table: {len(not_done)} run(s) not finished; see results.csv.")
    lines += _every_setting(groups, chosen, at)
    table = header + "\n".join(lines) + "\n"
    write_text_atomic(out / "table.md", table)
    files = _plots(chosen, curves, splits, out)
    print(table)
    return {"rows": rows, "chosen": chosen, "table": table, "plots": files}


def _cell(row, shortest):
    """The table row a run belongs to: its split, and its horizon where it ran longer than
    the sweep's ``shortest`` (a run continued to more rounds is another reading of the same
    setting and seed, not another seed of it)."""
    return row["split"] if row["rounds"] == shortest else f"{row['split']}, {row['rounds']} rounds"


def _setting_label(setting):
    """'lr=0.1, beta=0.025': the lr and whichever of β, μ the algorithm uses."""
    return ", ".join(f"{k}={v:g}" for k, v in zip(SETTING_KEYS, setting) if v or k == "lr")


def _pct(value):
    return "–" if value is None else f"{100 * value:.1f}"


def _every_setting(groups, chosen, at):
    """Each setting tried, as the choice saw it: validation accuracy over the seeds all of
    its cell's settings share, test accuracy over its own seeds, the rounds read."""
    read = {"best_val": "best round", "final": "round", "last_mean": "last round"}[at]
    lines = ["", "Every setting (chosen in bold; validation over the seeds the cell's settings share):", "",
             f"| split | algorithm | setting | validation (%) | test (%) | seeds | {read} |",
             "|---|---|---|---:|---:|---:|---|"]
    for (split, algorithm), settings in sorted(groups.items()):
        common = set.intersection(*({r["seed"] for r in rs} for rs in settings.values()))
        for setting, seeds in sorted(settings.items()):
            val = mean_std([r["val_accuracy"] for r in seeds if r["seed"] in common])[0]
            test = mean_std([r["test_accuracy"] for r in seeds])[0]
            what = _setting_label(setting)
            if chosen[(split, algorithm)][0] == setting:
                what = f"**{what}**"
            rounds = ", ".join(str(r["round"]) for r in sorted(seeds, key=lambda r: r["seed"]))
            lines.append(f"| {split} | {algorithm} | {what} | {_pct(val)} | {_pct(test)} | {len(seeds)} | {rounds} |")
    return lines


def _against_fedavg(chosen, splits, algorithms):
    """Each algorithm's test accuracy minus FedAvg's on the same split and seed (the seed
    fixes the split and the clients sampled, so the pairs share them), each at its own
    chosen setting: mean ± std of the paired differences over the seeds both have."""
    others = [a for a in algorithms if a != "fedavg"]
    if "fedavg" not in algorithms or not others:
        return []
    lines = ["", "| split | " + " | ".join(f"{a} − fedavg" for a in others) + " |",
             "|---|" + "---:|" * len(others)]

    def by_seed(key):
        return {r["seed"]: r["test_accuracy"] for r in chosen[key][1]}

    for split in splits:
        cells = []
        for a in others:
            if (split, "fedavg") not in chosen or (split, a) not in chosen:
                cells.append("–")
                continue
            diffs = paired_differences(by_seed((split, "fedavg")), by_seed((split, a)))
            cells.append("–" if not diffs else f"{mean_pm(diffs, scale=1, sign='+')} (n={len(diffs)})")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines.append("Differences: test accuracy points, paired by seed (mean ± std over seeds).")
    return lines


# What a round costs a participating client, per algorithm (each strategy's cost):
# synchronisations (round trips with the server), and the vectors of the model's size it
# sends up and receives down.
EQUAL_COST = {
    "synchronisations": ("C", lambda cost: cost.syncs),
    "bytes": ("B", lambda cost: cost.up + cost.down),
}


def _round_costs(algorithms):
    if len({ROUND_COST[a] for a in algorithms}) < 2:
        return []
    return ["", "What a round costs a participating client: " + "; ".join(
        f"{a} {ROUND_COST[a].syncs} synchronisation{'s' if ROUND_COST[a].syncs > 1 else ''}, "
        f"{ROUND_COST[a].up} model-sized vector{'s' if ROUND_COST[a].up > 1 else ''} up and "
        f"{ROUND_COST[a].down} down" for a in algorithms) + "."]


def _at_equal_cost(chosen, curves, splits, algorithms, at, measure="synchronisations"):
    """Algorithms whose rounds cost differently (FedGA talks twice a round; one-sync FedGA
    and SCAFFOLD send twice FedAvg's bytes) read again on one budget: each chosen setting
    over its first rounds that fit C synchronisations (or B model-sized vectors sent and
    received per client), C the least any of the split's runs had, so that every algorithm
    is compared on the same budget (FedAvg − paired by seed)."""
    symbol, per_round = EQUAL_COST[measure]
    if len({per_round(ROUND_COST[a]) for a in algorithms}) < 2:
        return []

    def spent(algorithm, row):
        return (row.get("round") or 0) * per_round(ROUND_COST[algorithm])

    def total(algorithm, run):
        return max((spent(algorithm, r) for r in curves[run["id"]]["history"]), default=0)

    unit = ("synchronisations" if measure == "synchronisations"
            else "model-sized vectors sent and received per client")
    lines = ["", f"At equal {measure} (each run read over its first {symbol} {unit}, {symbol} the "
             "least any run of the split had; the setting as chosen above):", "",
             f"| split | {symbol} | " + " | ".join(algorithms) + " | " +
             " | ".join(f"{a} − fedavg" for a in algorithms if a != "fedavg") + " |",
             "|---|---:|" + "---|" * len(algorithms) + "---:|" * (len(algorithms) - 1)]
    for split in splits:
        keys = [(split, a) for a in algorithms if (split, a) in chosen and _drawn(chosen[(split, a)][1], curves)]
        if not keys:
            continue
        budget = min(total(a, run) for _, a in keys for run in _drawn(chosen[(split, a)][1], curves))
        tests = {a: {run["seed"]: pick_epoch([r for r in curves[run["id"]]["history"]
                                              if spent(a, r) <= budget], at).get("test_accuracy")
                     for run in _drawn(chosen[(split, a)][1], curves)} for _, a in keys}
        cells = []
        for a in algorithms:
            values = list(tests.get(a, {}).values())
            cells.append("–" if mean_std(values)[0] is None else f"{mean_pm(values)} (n={len(values)})")
        for a in algorithms:
            if a == "fedavg":
                continue
            cells.append(mean_pm(paired_differences(tests.get("fedavg", {}), tests.get(a, {})), scale=1, sign="+"))
        lines.append(f"| {split} | {budget} | " + " | ".join(cells) + " |")
    return lines


def _curves_left_out(chosen, curves):
    """Says which chosen runs the curve tables above could not read, since a cell's n there
    can then be below the main table's and its seeds need not be the other cells' seeds."""
    left = sorted((split, a, r["seed"]) for (split, a), (_, seeds) in chosen.items()
                  for r in seeds if not _has_curve(r, curves))
    if not left:
        return []
    return ["", "The equal-cost and trend tables read only runs with their per-round "
            "metrics; these chosen runs were restored from a results table without them and are "
            "left out there (so n and the seeds differ between those cells): "
            + "; ".join(f"{split} {a} seed {seed}" for split, a, seed in left) + "."]


def _has_curve(run, curves):
    """Whether ``run`` kept its per-round metrics (not restored from a results table alone)."""
    return bool(curves[run["id"]]["history"])


def _drawn(seeds, curves):
    """The runs among ``seeds`` whose curves the tables can read."""
    return [r for r in seeds if _has_curve(r, curves)]


def _trend(chosen, curves, splits, algorithms, every=100):
    """Where the curves flatten: each chosen setting's test accuracy averaged over the TAIL
    evaluations ending at every ``every``-th round (the plots' trend lines; a reading that
    no single round's draw of clients decides), mean over seeds, and each algorithm's
    paired difference to FedAvg at those rounds."""
    def trailing(run, upto):
        return pick_epoch([r for r in curves[run["id"]]["history"] if (r.get("round") or 0) <= upto],
                          "last_mean").get("test_accuracy")

    lines = ["", f"Where the curves flatten: test accuracy (%) averaged over the {TAIL} evaluations "
             "ending at each round, the chosen settings, mean over seeds (difference rows: paired "
             "by seed, in points):"]
    for split in splits:
        keys = [(split, a) for a in algorithms if (split, a) in chosen and _drawn(chosen[(split, a)][1], curves)]
        if not keys:
            continue
        horizon = min(max((r.get("round") or 0 for r in curves[run["id"]]["history"]), default=0)
                      for key in keys for run in _drawn(chosen[key][1], curves))
        marks = sorted({*range(every, horizon + 1, every), horizon} - {0})
        if not marks:
            continue
        at = {a: {m: {run["seed"]: trailing(run, m) for run in _drawn(chosen[(split, a)][1], curves)}
                  for m in marks} for _, a in keys}
        lines += ["", f"| {split} | " + " | ".join(f"round {m}" for m in marks) + " |",
                  "|---|" + "---:|" * len(marks)]
        for a in at:
            means = [mean_std(list(at[a][m].values()))[0] for m in marks]
            lines.append(f"| {a} (n={len(at[a][marks[0]])}) | " + " | ".join(_pct(v) for v in means) + " |")
        for a in at:
            if a == "fedavg" or "fedavg" not in at:
                continue
            diffs = [mean_std(paired_differences(at["fedavg"][m], at[a][m]))[0] for m in marks]
            lines.append(f"| {a} − fedavg | " + " | ".join("–" if d is None else f"{d:+.1f}" for d in diffs) + " |")
    return lines


def _plots(chosen, curves, splits, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def seed_mean(seeds, kind, scale):
        per_seed = [dict(curves[r["id"]][kind]) for r in seeds]
        xs = sorted(set.intersection(*(set(c) for c in per_seed)))
        return xs, [scale * statistics.fmean(c[x] for c in per_seed) for x in xs]

    files = []
    for split in splits:
        name = "test_accuracy_vs_rounds_" + "".join(ch if ch.isalnum() else "_" for ch in split) + ".png"
        if not any(s == split and _drawn(seeds, curves) for (s, _), (_, seeds) in chosen.items()):
            # Only table-only runs here: nothing to draw, and an older plot would be stale.
            (out / name).unlink(missing_ok=True)
            continue
        fig, (acc, var) = plt.subplots(1, 2, figsize=(11, 4))
        for (s, algorithm), (_, every_seed) in sorted(chosen.items()):
            seeds = _drawn(every_seed, curves)
            if s != split or not seeds:
                continue
            xs, ys = seed_mean(seeds, "accuracy", 100)
            line, = acc.plot(xs, ys, marker=".", alpha=0.3)
            # a noisy curve's trend: the mean over the last TAIL evaluations at each point
            trend = [statistics.fmean(ys[max(0, i + 1 - TAIL):i + 1]) for i in range(len(ys))]
            acc.plot(xs, trend, color=line.get_color(),
                     label=f"{algorithm} (n={len(seeds)})")
            var.plot(*seed_mean(seeds, "variance", 1), marker=".", label=algorithm)
        acc.set_xlabel("communication rounds (FedGA: 2 per round)")
        acc.set_ylabel("test accuracy (%)")
        acc.set_title(f"split: {split} (lines: mean of the last {TAIL} evaluations)")
        var.set_xlabel("round")
        var.set_ylabel("V at x: mean ‖g_i − ḡ‖² over the participants")
        var.set_yscale("log")
        var.set_title("clients' gradient variance")
        for ax in (acc, var):
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(out / name)
    return files
