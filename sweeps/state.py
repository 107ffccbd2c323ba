"""What state each point of a sweep is in, read from its run directory.

``launcher.json`` in a point's folder is written by whichever launcher ran it
(local or a SLURM array task): state, return code, job id, log path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hvd_gradalign.checkpoint import write_text_atomic
from train.run import EXIT_INTERRUPTED

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


def point_state(run_dir, active_jobs=frozenset()) -> str:
    """done | failed | running | interrupted | pending.

    ``active_jobs``: SLURM job ids (array task ids, '123_4') the scheduler still
    has queued or running; a point whose launcher says 'running' under a job the
    scheduler no longer knows has died without a word, so it counts as failed."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    if summary.get("status") == "finished":
        return DONE
    launcher = read_json(run_dir / "launcher.json") or {}
    state = launcher.get("state")
    if state in ("running", "submitted"):
        job = launcher.get("slurm_job")
        if job is None or job in active_jobs:
            return RUNNING
        return FAILED
    if state == "exited":
        # A clean exit without a finished summary (checked above) is a failure too.
        return INTERRUPTED if launcher.get("returncode") == EXIT_INTERRUPTED else FAILED
    if (run_dir / "checkpoints" / "LATEST").exists():
        return INTERRUPTED
    return PENDING
