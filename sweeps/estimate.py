"""How long the rest of a sweep will take, from what its own runs measured.

A run's cost per epoch (round) depends on what it computes per epoch, not on its lr, β,
μ or seed: points that share the COST_KEYS share a rate, measured as the median of their
runs' own wall time per own epoch (evaluations included; a continued run counts only
what it ran itself). It also depends on the kernels that computed it: TensorFlow's oneDNN
CPU kernels train up to 2x faster than its Eigen ones here (train/launch.py). A run whose
last session was recorded (sessions.json) is measured over that session alone, under the
kernels it had, and the points still to run are costed at the rates of the kernels
`python -m train` will ask for, where any run measured them. A point with no measured
rate is named, not guessed.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from sweeps import extend, state
from train.config import budget, is_federated
from train.launch import onednn_requested

UNRECORDED = None  # the kernels of a run whose last session was not recorded

COST_KEYS = {
    False: (("model", "model"), ("optim", "optimizer"), ("train", "batch_size"), ("data", "train_samples"),
            ("optim", "micro_batch_size"), ("optim", "micro_batches"), ("train", "eval_every"),
            ("train", "eval_train")),
    True: (("model", "model"), ("federated", "algorithm"), ("federated", "clients_per_round"),
           ("federated", "local_steps"), ("federated", "local_batch"), ("federated", "grad_samples"),
           ("federated", "eval_rounds"), ("federated", "variance_every"), ("data", "train_samples")),
}


def cost_key(config: dict) -> tuple:
    federated = is_federated(config)
    return (federated,) + tuple(config.get(s, {}).get(k) for s, k in COST_KEYS[federated])


def units_done(run_dir, history=None) -> int:
    """The epochs (rounds) a run has recorded."""
    if history is None:
        history = state.read_json(run_dir / "metrics.json") or []
    return max((r.get("round", r.get("epoch", 0)) for r in history), default=0)


def last_session_rate(run_dir, history):
    """(oneDNN on, seconds per epoch) over the run's last recorded session, or None where
    it has no recorded session, or its last one has not finished an epoch yet or started
    where the history has no wall time to count from."""
    sessions = state.read_json(run_dir / state.SESSIONS) or []
    if not sessions:
        return None
    start = sessions[-1].get("start", 0)
    walls = {r.get("round", r.get("epoch")): r.get("wall_time") for r in history}
    end = units_done(run_dir, history)
    before = 0.0 if start == 0 else walls.get(start)
    if end <= start or before is None or walls.get(end) is None:
        return None
    return bool(sessions[-1].get("onednn")), (walls[end] - before) / (end - start)


def measured_rates(runs_dir) -> dict:
    """(cost_key, kernels) -> seconds per epoch (round), over the runs in ``runs_dir``;
    kernels is whether oneDNN computed the measured part, or UNRECORDED."""
    seconds = defaultdict(list)
    for run_dir in state.run_dirs(runs_dir):
        config = state.read_json(run_dir / "config.json")
        restored = state.read_json(run_dir / state.RESTORED)
        if config and restored:
            # A table-only run (sweeps/archive.py): its row's totals; a continued one's row
            # does not say how much it copied, so it does not count.
            row = restored["row"]
            done = row.get("epochs_done", row.get("rounds_done"))
            if done and row.get("wall_time") and not row.get("continued_from"):
                seconds[cost_key(config), UNRECORDED].append(row["wall_time"] / done)
            continue
        history = state.read_json(run_dir / "metrics.json") or []
        if not config or not history or history[-1].get("wall_time") is None:
            continue
        session = last_session_rate(run_dir, history)
        if session is not None:
            seconds[cost_key(config), session[0]].append(session[1])
            continue
        copied = state.read_json(run_dir / state.CONTINUED_FROM) or {}
        own_units = units_done(run_dir, history) - copied.get("epochs_done", 0)
        if own_units > 0:
            seconds[cost_key(config), UNRECORDED].append(
                (history[-1]["wall_time"] - copied.get("wall_time", 0.0)) / own_units)
    return {key: statistics.median(v) for key, v in seconds.items()}


def rate_for(rates: dict, config: dict, onednn: bool):
    """Seconds per epoch (round) for a point that will run with oneDNN on or off: the rate
    measured under those kernels, else the median of what was measured under any."""
    key = cost_key(config)
    if (key, onednn) in rates:
        return rates[key, onednn]
    other = [v for (k, _), v in rates.items() if k == key]
    return statistics.median(other) if other else None


@dataclass
class Remaining:
    seconds: float = 0.0
    points: int = 0
    unmeasured: list = field(default_factory=list)   # points with no measured rate


def remaining(sweep, states, continued=None) -> Remaining:
    """The launcher time the points that are not done still need; ``continued`` is
    extend.predecessors(sweep, states), if the caller has it already."""
    continued = extend.predecessors(sweep, states) if continued is None else continued
    rates = measured_rates(sweep.runs_dir)
    onednn = onednn_requested()
    out = Remaining()
    for p in sweep.points:
        if states[p.id] == state.DONE:
            continue
        start = units_done(p.run_dir) if p.run_dir.exists() else 0
        if p.id in continued:
            start = continued[p.id][1]
        rate = rate_for(rates, p.config, onednn)
        out.points += 1
        if rate is None:
            out.unmeasured.append(p)
        else:
            out.seconds += rate * max(0, budget(p.config) - start)
    return out


def describe(r: Remaining) -> str:
    if not r.points:
        return "nothing left to run"
    if len(r.unmeasured) == r.points:
        return (f"still to run: {r.points} points, none with a measured rate yet (the time left "
                "shows once a run of each kind has recorded an epoch or round)")
    text = f"still to run: {r.points} points, about {r.seconds / 3600:.1f} h of one launcher"
    if r.unmeasured:
        text += (f" plus {len(r.unmeasured)} with no measured rate yet ("
                 + ", ".join(p.id for p in r.unmeasured[:4]) + (", ..." if len(r.unmeasured) > 4 else "") + ")")
    return text + " (rates: the sweep's own runs, per epoch or round, under the kernels it will use where measured)"
