"""A sweep's finished runs, kept where a fresh clone finds them.

A sweep's run folders live on the machine that ran it (``runs/`` is not versioned), and
a sweep that spans sessions must survive that machine being replaced. So a report written
to a folder of its own also saves the records of every finished run there (``runs/<id>/``:
config, summary, per-epoch metrics; no checkpoints or logs, a few kB to a few hundred kB a
run), and ``python -m sweeps restore`` puts them back in the sweep's runs folder, where
``run``, ``status`` and ``report`` find them as they were.

Runs that finished before reports saved their records survive only as rows of the
report's results.csv. Those are restored as *table-only* runs: the point's config from the
spec, a finished summary, and the row itself (``restored.json``). A report reads such a
run as the row says, only at the reading the table was made at, and draws no curve for it;
it says how many it holds. Neither kind has a checkpoint, so neither is continued to a
raised budget (sweeps/extend.py needs one): such a point runs from the start.

A point that takes longer than a session would never finish on machines that are replaced
between sessions. So a report asked to (``checkpoints=True``) also *parks* each interrupted
run: its records and its newest intact checkpoint (one model with its optimizer state),
which ``restore`` puts back with the rest; ``run`` then resumes the point where it stopped.
Opt-in because checkpoints are binary and can be large; a parked checkpoint is dropped from
the folder by the first report that finds its run finished.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from hvd_gradalign_base import files
from hvd_gradalign_base.files import write_text_atomic
from sweeps import state
from train.config import budget

RECORDS = "runs"
RECORD_FILES = ("config.json", "summary.json", "metrics.json", "launcher.json", state.CONTINUED_FROM,
                state.RESTORED, state.SESSIONS)
CHECKPOINTS = "checkpoints"
# Checkpoint folders of training runs (hvd_gradalign/checkpoint.py) and federated ones
# (train/federated_run.py): one layout, two name patterns.
CHECKPOINT_PATTERNS = ("ckpt-*", "round-*")


def save(runs_dir, out, checkpoints=False) -> dict:
    """Copy the records of every finished run in ``runs_dir`` to ``out/runs/<id>/``, and
    with ``checkpoints`` park every interrupted run there too (records and newest intact
    checkpoint). Returns {"finished": n, "parked": n}."""
    counts = {"finished": 0, "parked": 0}
    for run_dir in state.run_dirs(runs_dir):
        if not (run_dir / "config.json").exists():
            continue
        now = state.point_state(run_dir)
        target = Path(out) / RECORDS / run_dir.name
        if now == state.DONE:
            _save_records(run_dir, target)
            shutil.rmtree(target / CHECKPOINTS, ignore_errors=True)  # parked while it was interrupted
            counts["finished"] += 1
        elif now == state.INTERRUPTED and checkpoints and _park_checkpoint(run_dir, target):
            _save_records(run_dir, target)
            counts["parked"] += 1
    return counts


def _save_records(run_dir, target) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if not (run_dir / name).exists():
            # e.g. the restored.json of a table-only run that has since been run again
            (target / name).unlink(missing_ok=True)
            continue
        text = (run_dir / name).read_text()
        if name == "launcher.json":  # which process ran it means nothing elsewhere
            text = json.dumps({k: v for k, v in json.loads(text).items()
                               if k in ("launcher", "workers", "state", "returncode")}, indent=1)
        if not (target / name).exists() or (target / name).read_text() != text:
            write_text_atomic(target / name, text)


def _newest_checkpoint(run_dir):
    """The newest intact checkpoint of ``run_dir`` (the one a re-run would resume from), or
    None when it has none, or only damaged ones (that run starts over wherever it runs)."""
    for pattern in CHECKPOINT_PATTERNS:
        try:
            found = files.latest(Path(run_dir) / CHECKPOINTS, warn=lambda _: None, pattern=pattern)
        except files.CheckpointError:
            continue
        # LATEST is tried first whatever the pattern: keep it only under its own.
        if found is not None and found.match(pattern):
            return found, pattern
    return None


def _park_checkpoint(run_dir, target) -> bool:
    """Put the newest intact checkpoint of ``run_dir`` in ``target/checkpoints/`` as the only
    one there; False when there is none to park."""
    newest = _newest_checkpoint(run_dir)
    if newest is None:
        return False
    source, pattern = newest
    dest = Path(target) / CHECKPOINTS
    if files.verify(dest / source.name) is not None:  # not parked by an earlier report
        staging = dest / f".{source.name}.parking"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(dest / source.name, ignore_errors=True)
        staging.replace(dest / source.name)
    files.publish(dest, source.name, keep=1, pattern=pattern)
    return True


def _number(text):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def restore(sweep, source, at=None) -> dict:
    """Put back the runs of ``sweep``'s points that have no folder yet: from the records in
    ``source/runs/`` where there are some, otherwise (table-only) from the finished rows of
    ``source/results.csv``, which were read ``at`` (best_val, final or last_mean: the
    table does not say). Returns {"records": n, "resumable": n, "table": n, "kept": n}:
    points restored each way (``resumable``: of the records, interrupted runs parked with a
    checkpoint, which ``run`` resumes), and points left alone because they have a folder here."""
    source = Path(source)
    counts = {"records": 0, "resumable": 0, "table": 0, "kept": 0}
    rows = {}
    if (source / "results.csv").exists():
        with open(source / "results.csv", newline="") as f:
            rows = {r["id"]: r for r in csv.DictReader(f) if r.get("status") == "done"}
    for point in sweep.points:
        records = source / RECORDS / point.id
        if not records.is_dir() and point.id not in rows:
            continue
        if point.run_dir.exists():
            counts["kept"] += 1
            continue
        staging = point.run_dir.parent / f".{point.id}.restoring"
        shutil.rmtree(staging, ignore_errors=True)
        if records.is_dir():
            shutil.copytree(records, staging)
            counts["records"] += 1
            counts["resumable"] += (records / CHECKPOINTS).is_dir()
        else:
            if at is None:
                raise ValueError(f"{point.id} survives only as a row of {source / 'results.csv'}: say which "
                                 "reading that table was made at (--at best_val, final or last_mean)")
            row = {k: _number(v) for k, v in rows[point.id].items()}
            staging.mkdir(parents=True)
            write_text_atomic(staging / "config.json", json.dumps(point.config, indent=1))
            write_text_atomic(staging / state.RESTORED, json.dumps(
                {"from": str(source / "results.csv"), "at": at, "row": row}, indent=1))
            done = row.get("epochs_done", row.get("rounds_done"))
            write_text_atomic(staging / "summary.json", json.dumps(
                {"status": "finished", "epochs_done": done, "rounds_done": done,
                 "workers": row.get("workers", point.workers)}, indent=1))
            counts["table"] += 1
        state.move_in(staging, point.run_dir)
    return counts


def restored_row(run_dir, at):
    """The row a table-only run was restored from, or None for a run with its own records.
    Raises if the report asks for another reading than the table was made at."""
    restored = state.read_json(Path(run_dir) / state.RESTORED)
    if restored is None:
        return None
    if restored["at"] != at:
        raise ValueError(f"{Path(run_dir).name} was restored from a table read at {restored['at']} "
                         f"({restored['from']}), without its per-epoch metrics: report with --at "
                         f"{restored['at']}, or delete its folder and run it again")
    return restored["row"]


def restored_result(run_dir, at, columns, config):
    """A report's row for a table-only run (its table's values of ``columns``, with its id,
    state and what it continued from), or None for a run with its own records."""
    restored = restored_row(run_dir, at)
    if restored is None:
        return None
    return {**{k: restored.get(k) for k in columns}, "id": Path(run_dir).name,
            "status": state.point_state(run_dir, wanted=budget(config)),
            "continued_from": restored.get("continued_from") or ""}


def restored_note(run_dirs) -> str:
    """A report's line on its table-only runs, or ''."""
    n = sum((Path(d) / state.RESTORED).exists() for d in run_dirs)
    if not n:
        return ""
    return (f"\n{n} finished run(s) here were restored from the results table of an earlier report "
            f"(`{state.RESTORED}` in each): their per-epoch metrics are lost, so they are read as that "
            "table read them and no curve is drawn for them.\n")
