"""A point whose budget was raised continues the run it extends.

Raising a point's epochs (rounds) in a spec makes it a new point (the budget is part of
its identity), but with a constant learning rate the longer run is the shorter one
continued: data order and client draws are seeded per epoch (round), and a resumed run
equals an uninterrupted one (tested). So a new point whose sweep folder holds a
finished run of the same configuration with a smaller budget starts from a copy of that
run (checkpoints, metrics, logs) instead of from scratch. The shorter run is left as it
was: a spec may still ask for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hvd_gradalign_base.files import write_text_atomic
from sweeps import state
from sweeps.local import claim
from train.config import budget, resume_conflict, typed, with_value

NOT_COPIED = ("launcher.json", "launcher.lock", "point.toml")


def _finished_runs(runs_dir: Path) -> list[tuple[Path, dict, dict]]:
    """(run dir, config, summary) of the runs in ``runs_dir`` that can be continued:
    finished at their own budget, with a checkpoint to start from."""
    found = []
    for run_dir in state.run_dirs(runs_dir):
        config = state.read_json(run_dir / "config.json")
        if (config and (run_dir / "checkpoints" / "LATEST").exists()
                and state.point_state(run_dir, wanted=budget(config)) == state.DONE):
            found.append((run_dir, config, state.read_json(run_dir / "summary.json") or {}))
    return found


def _longest_shorter(point, candidates) -> tuple[Path, int] | None:
    wanted, best = budget(point.config), None
    for run_dir, config, summary in candidates:
        done = summary.get("epochs_done", 0)
        if run_dir == point.run_dir or summary.get("workers") != point.workers or done >= wanted:
            continue
        # run_dir is the one key two runs of the same settings never share.
        same_place = with_value(config, "train", "run_dir", typed(point.config).train.run_dir)
        if resume_conflict(same_place, point.config) is None and (best is None or done > best[1]):
            best = (run_dir, done)
    return best


def predecessors(sweep, states) -> dict:
    """{point id: (run dir, epochs)} for the sweep's pending points that continue a run,
    reading the sweep's runs once. A point's predecessor is the finished run of the same
    configuration and workers with a smaller budget, a checkpoint to start from, and a
    schedule that does not depend on the total (resume_conflict); the longest such run."""
    candidates = _finished_runs(sweep.runs_dir)
    return {p.id: found for p in sweep.points
            if states[p.id] == state.PENDING and (found := _longest_shorter(p, candidates))}


def predecessor_now(sweep, point) -> tuple[Path, int] | None:
    """``predecessors`` for one point that has not started, read now: a local launcher
    asks just before it runs the point, since the run it continues may have finished
    after the launcher started (earlier in its own list, or in another launcher)."""
    if (point.run_dir / "config.json").exists() or state.point_state(point.run_dir) != state.PENDING:
        return None
    return _longest_shorter(point, _finished_runs(sweep.runs_dir))


def continue_from_predecessor(point, found: tuple[Path, int]) -> bool:
    """Seed a pending point's run dir with a copy of its predecessor's run ``found`` (from
    ``predecessors``); whether it was copied. Done under the point's lock, so two launchers
    cannot both seed it; the copy is made aside and moved in with the checkpoints and the
    summary last, so that an interruption leaves a point that resumes or one that starts
    over, never one that looks finished without its checkpoints."""
    source, _ = found
    with claim(point.run_dir) as mine:
        # Another launcher may have started or seeded the point since predecessors() looked.
        if not mine or state.point_state(point.run_dir) != state.PENDING \
                or (point.run_dir / "config.json").exists():
            return False
        staging = point.run_dir.parent / f".{point.id}.copying"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(*NOT_COPIED))
        # The copy is this point's run, not yet at its budget: its own config (resume
        # accepts it: only the budget differs), and a summary that does not say finished.
        write_text_atomic(staging / "config.json", json.dumps(point.config, indent=1))
        summary = state.read_json(staging / "summary.json") or {}
        write_text_atomic(staging / "summary.json", json.dumps({**summary, "status": "interrupted"}, indent=1))
        history = state.read_json(staging / "metrics.json") or [{}]
        write_text_atomic(staging / state.CONTINUED_FROM, json.dumps(
            {"run": source.name, "epochs_done": found[1], "wall_time": history[-1].get("wall_time", 0.0)}))
        # Until both are in, it resumes or starts over.
        state.move_in(staging, point.run_dir, last=("checkpoints", "summary.json"))
    return True
