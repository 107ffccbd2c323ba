"""What the distributed and the federated reports share: which evaluated epoch of a
run counts, mean ± std over seeds, and choosing a setting on validation over the
seeds that all settings share."""

from __future__ import annotations

import math
import statistics

AT = ("final", "best_val", "last_mean")
TAIL = 10  # evaluations that at="last_mean" averages


def reading(at, unit):
    """How a report's cells were read, e.g. "at the best-validation epoch"."""
    if at == "last_mean":
        return f"averaged over the last {TAIL} evaluations"
    return f"at the {'final' if at == 'final' else 'best-validation'} {unit}"


def pick_epoch(history, at):
    """The row that counts: the last evaluated one, (``best_val``) the evaluated row
    with the best validation accuracy, or (``last_mean``) the last one with each
    accuracy, loss and V averaged over the last TAIL evaluations (a reading that a
    noisy curve's lucky spike does not decide, for curves that have flattened)."""
    evaluated = [r for r in history if r.get("test_accuracy") is not None]
    if not evaluated:
        return history[-1] if history else {}
    if at == "last_mean":
        tail = evaluated[-TAIL:]
        averaged = {k: statistics.fmean(r[k] for r in tail) for k in tail[-1]
                    if k.endswith(("_accuracy", "_loss")) or k == "grad_variance"
                    if all(isinstance(r.get(k), (int, float)) for r in tail)}
        return {**tail[-1], **averaged}
    if at == "best_val" and any(r.get("val_accuracy") is not None for r in evaluated):
        return max((r for r in evaluated if r.get("val_accuracy") is not None),
                   key=lambda r: r["val_accuracy"])
    return evaluated[-1]


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_pm(values, scale=100.0, sign="") -> str:
    """A table cell's "mean ± std" of ``values`` times ``scale`` (``sign="+"`` signs the
    mean); a single value prints alone, since its spread is unknown, not zero."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    m, s = mean_std(finite)
    if m is None:
        return "–"
    return f"{scale * m:{sign}.2f}" + (f" ± {scale * s:.2f}" if len(finite) > 1 else "")


def paired_differences(base: dict, mine: dict) -> list:
    """``mine`` − ``base`` in points for every seed where both have a test accuracy
    (``{seed: accuracy}`` each, accuracies as fractions)."""
    return [100 * (mine[k] - base[k]) for k in sorted(set(base) & set(mine))
            if mine[k] is not None and base[k] is not None]


def best_setting(settings, key, better):
    """The setting (a tuple of grid values) whose seeds score best on ``key``, over the
    seeds that all settings share. On an exact tie the smaller setting wins (compared
    value by value in the caller's key order, lr first), the one nearer plain SGD, so that
    a value bracketing the choice from above must beat it to move it, whatever order the
    runs were read in."""
    common = set.intersection(*({r["seed"] for r in rs} for rs in settings.values()))

    def score(s):
        m = mean_std([r[key] for r in settings[s] if not common or r["seed"] in common])[0]
        return m if m is not None else (-math.inf if better is max else math.inf)

    # max and min keep the first of equal scores
    return better(sorted(settings, key=_smaller_first), key=score)


def _smaller_first(setting):
    # numbers before text and None, so that a grid value missing in one setting still compares
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool)
                 else (1, 0, str(v)) for v in setting)
