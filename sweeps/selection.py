"""What the distributed and the federated reports share: which evaluated epoch of a
run counts, mean ± std over seeds, and choosing a setting on validation over the
seeds that all settings share."""

from __future__ import annotations

import math
import statistics

AT = ("final", "best_val")


def pick_epoch(history, at):
    """The row that counts: the last evaluated one, or (``best_val``) the evaluated row
    with the best validation accuracy."""
    evaluated = [r for r in history if r.get("test_accuracy") is not None]
    if not evaluated:
        return history[-1] if history else {}
    if at == "best_val" and any(r.get("val_accuracy") is not None for r in evaluated):
        return max((r for r in evaluated if r.get("val_accuracy") is not None),
                   key=lambda r: r["val_accuracy"])
    return evaluated[-1]


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def best_setting(settings, key, better):
    common = set.intersection(*({r["seed"] for r in rs} for rs in settings.values()))

    def score(s):
        m = mean_std([r[key] for r in settings[s] if not common or r["seed"] in common])[0]
        return m if m is not None else (-math.inf if better is max else math.inf)

    return better(settings, key=score)
