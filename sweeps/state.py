"""What state each point of a sweep is in, read from its run directory.

``launcher.json`` in a point's folder is written by whichever launcher ran it
(local or a SLURM array task): state, return code, job id, log path, and for the
local launcher its pid and host, so that a launcher killed without a word does not
leave a point "running" for ever.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from hvd_gradalign_base.files import write_text_atomic

DONE, FAILED, RUNNING, INTERRUPTED, PENDING = "done", "failed", "running", "interrupted", "pending"


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def record(run_dir, **fields) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    current = read_json(run_dir / "launcher.json") or {}
    current.update(fields, updated=time.time())
    write_text_atomic(run_dir / "launcher.json", json.dumps(current, indent=1))


# What a run continued from a copy of another (sweeps/extend.py) inherited: that run's
# name, epochs (rounds) and wall time, so that totals count compute once.
CONTINUED_FROM = "continued_from.json"
# A run put back from a report's results table alone (sweeps/archive.py): the row, the table
# it came from and the reading it was made at.
RESTORED = "restored.json"
SESSIONS = "sessions.json"  # written by train/recorder.py: what computed each session


def provenance(run_dir, wall_time) -> dict:
    """``continued_from`` (the run it was copied from, or ''), ``own_wall_time`` (its
    wall time less what it inherited) and ``onednn`` (whether TensorFlow's oneDNN CPU
    kernels computed it: on, off, mixed over its sessions, or '' where its sessions were
    not all recorded: none was, or the first recorded one resumed it), for results tables."""
    copied = read_json(Path(run_dir) / CONTINUED_FROM) or {}
    own = None if wall_time is None else wall_time - copied.get("wall_time", 0.0)
    sessions = read_json(Path(run_dir) / SESSIONS) or []
    kernels = {s.get("onednn") for s in sessions}
    if not sessions or sessions[0].get("start") != 0:
        onednn = ""
    else:
        onednn = "mixed" if len(kernels) > 1 else "on" if kernels == {True} else "off"
    return {"continued_from": copied.get("run", ""), "own_wall_time": own, "onednn": onednn}


def move_in(staging, run_dir, last=("summary.json",)) -> None:
    """Move everything in the folder ``staging`` into ``run_dir`` (replacing what is there),
    the entries named in ``last`` last and in that order, then remove ``staging``. A move cut
    short then leaves a point that runs or resumes, never one that looks finished without
    what its summary relies on."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    order = {name: i + 1 for i, name in enumerate(last)}
    for entry in sorted(Path(staging).iterdir(), key=lambda e: order.get(e.name, 0)):
        target = run_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    Path(staging).rmdir()


def run_dirs(runs_dir) -> list[Path]:
    """A sweep folder's run folders; hidden ones are copies in the making (sweeps/extend.py)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []  # nothing has run yet
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _alive(launcher: dict) -> bool:
    """Whether the local launcher process that claims a point still runs."""
    pid = launcher.get("pid")
    if pid is None or launcher.get("host") != socket.gethostname():
        return True  # cannot tell from here: trust the record
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _from_run_files(run_dir: Path, summary: dict) -> str:
    """A point that is not running: what its own files say. Launcher exit codes
    are not used (horovodrun reports 1 for a worker that exited 75)."""
    if summary.get("status") == "diverged":
        return FAILED
    if summary.get("status") == "interrupted" or (run_dir / "checkpoints" / "LATEST").exists():
        return INTERRUPTED
    return FAILED


def point_state(run_dir, active_jobs=frozenset(), wanted=None) -> str:
    """done | failed | running | interrupted | pending.

    ``active_jobs``: SLURM job ids (array task ids, '123_4') the scheduler still
    has queued or running. A point whose launcher says 'running' is running only
    while its launcher is: a SLURM task the scheduler still knows, or a local
    launcher process that is alive. Otherwise the run's own files decide: a
    checkpoint to resume from makes it interrupted, nothing makes it failed.
    ``wanted``: the epochs (rounds) the point asks for; a run that finished fewer (a
    point whose budget was raised) is interrupted: re-running continues it."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    if summary.get("status") == "finished":
        if wanted is None or summary.get("epochs_done", wanted) >= wanted:
            return DONE
        summary = {**summary, "status": "interrupted"}
    launcher = read_json(run_dir / "launcher.json") or {}
    state = launcher.get("state")
    if state in ("running", "submitted"):
        job = launcher.get("slurm_job")
        if (job is not None and job in active_jobs) or (job is None and _alive(launcher)):
            return RUNNING
        return _from_run_files(run_dir, summary)
    if state == "exited" or summary.get("status") == "interrupted":
        return _from_run_files(run_dir, summary)
    if (run_dir / "checkpoints" / "LATEST").exists():
        return INTERRUPTED
    return PENDING
