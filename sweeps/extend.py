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

from hvd_gradalign.checkpoint import write_text_atomic
from sweeps import state
from sweeps.local import claim
from train.config import budget, resume_conflict

NOT_COPIED = ("launcher.json", "launcher.lock", "point.toml")
CONTINUED_FROM = state.CONTINUED_FROM


def predecessor(point, runs_dir: Path) -> tuple[Path, int] | None:
    """The finished run in ``runs_dir`` that ``point`` continues, and its epochs (rounds):
    the same configuration and workers, a smaller budget, a checkpoint to start from, and
    a schedule that does not depend on the total (resume_conflict); the longest such run."""
    wanted, best = budget(point.config), None
    for run_dir in state.run_dirs(runs_dir):
        previous = state.read_json(run_dir / "config.json")
        summary = state.read_json(run_dir / "summary.json") or {}
        if run_dir == point.run_dir or not previous or summary.get("workers") != point.workers:
            continue
        previous["train"]["run_dir"] = point.config["train"]["run_dir"]
        done = summary.get("epochs_done", 0)
        if (resume_conflict(previous, point.config) is None and done < wanted
                and state.point_state(run_dir, wanted=budget(previous)) == state.DONE
                and (run_dir / "checkpoints" / "LATEST").exists()
                and (best is None or done > best[1])):
            best = (run_dir, done)
    return best


def continue_from_predecessor(point, runs_dir: Path) -> tuple[Path, int] | None:
    """Seed a pending point's run dir with a copy of its predecessor's run, if it has one
    (what was copied, or None). Done under the point's lock, so two launchers cannot both
    seed it; the copy is made aside and moved in with the checkpoints and the summary last,
    so that an interruption leaves a point that resumes or one that starts over, never one
    that looks finished without its checkpoints."""
    found = predecessor(point, runs_dir)
    if found is None:
        return None
    source, _ = found
    with claim(point.run_dir) as mine:
        if not mine or state.point_state(point.run_dir) != state.PENDING \
                or (point.run_dir / "config.json").exists():
            return None
        staging = point.run_dir.parent / f".{point.id}.copying"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(*NOT_COPIED))
        # The copy is this point's run, not yet at its budget: its own config (resume
        # accepts it: only the budget differs), and a summary that does not say finished.
        write_text_atomic(staging / "config.json", json.dumps(point.config, indent=1))
        summary = state.read_json(staging / "summary.json") or {}
        write_text_atomic(staging / "summary.json", json.dumps({**summary, "status": "interrupted"}, indent=1))
        history = state.read_json(staging / "metrics.json") or [{}]
        write_text_atomic(staging / CONTINUED_FROM, json.dumps(
            {"run": source.name, "epochs_done": found[1], "wall_time": history[-1].get("wall_time", 0.0)}))
        last = {"checkpoints": 1, "summary.json": 2}  # until both are in, it resumes or starts over
        for entry in sorted(staging.iterdir(), key=lambda e: last.get(e.name, 0)):
            target = point.run_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            entry.replace(target)
        staging.rmdir()
    return found
