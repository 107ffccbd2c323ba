"""The local launcher: points one after another, each under horovodrun (or alone).
Several local launchers may run the same sweep at once (one per GPU or per core
set): each point is claimed with a lock in its run directory, so no point runs twice."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sweeps import state
from sweeps.launcher import Launcher
from sweeps.spec import REPO, write_point_config
from train.config import budget
from train.launch import horovodrun_command, subprocess_env

STOP_GRACE_S = 120  # how long an interrupted point may take to checkpoint and exit


def point_command(point, python=sys.executable) -> list[str]:
    return horovodrun_command(point.workers, ["-m", "train", "--config", point.run_dir / "point.toml"],
                              python)


def run_point(point, env) -> int:
    write_point_config(point)
    log = point.run_dir / "train.log"
    state.record(point.run_dir, state="running", launcher="local", log=str(log), slurm_job=None,
                 pid=os.getpid(), host=socket.gethostname())
    rc = None
    try:
        with open(log, "a") as out:
            proc = subprocess.Popen(point_command(point), cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                # Ctrl-C: let the run checkpoint (it stops at the next step on
                # SIGINT/SIGTERM) instead of killing it mid-write.
                proc.send_signal(signal.SIGINT)
                try:
                    rc = proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                raise
    finally:
        # Also on Ctrl-C: the point's own files then say whether it can resume.
        state.record(point.run_dir, state="exited", returncode=rc)
    return rc


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def claim(run_dir: Path):
    """Yields True while this process holds the point's lock, False if another
    launcher holds it. flock, not a marker file: the kernel drops the lock when its
    holder dies, so a killed launcher leaves nothing to clean up."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "launcher.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LocalLauncher(Launcher):
    """Points one after another in this process's foreground; ``submit`` returns
    when they have all ended (a failed point does not stop the others). A point that
    another local launcher has claimed, or finished, since the list was made is skipped."""

    name = "local"

    def __init__(self):
        self.failed = []
        self.skipped = []

    def submit(self, sweep, points, before_each=None) -> str:
        # SIGTERM (kill, a session's end) must checkpoint the current point like Ctrl-C,
        # not orphan it; and a launcher started with '&' from a script has SIGINT ignored.
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run_all(points, before_each)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run_all(self, points, before_each) -> str:
        env = subprocess_env()
        for i, p in enumerate(points, 1):
            if before_each:
                before_each(p)
            with claim(p.run_dir) as mine:
                # Checked under the lock: another launcher may have finished it meanwhile.
                now = state.point_state(p.run_dir, wanted=budget(p.config)) if mine else state.RUNNING
                if now in (state.DONE, state.RUNNING):
                    print(f"[{i}/{len(points)}] {p.id} skipped: {now} in another launcher", flush=True)
                    self.skipped.append(p.id)
                    continue
                print(f"[{i}/{len(points)}] {p.id} {p.params}", flush=True)
                rc = run_point(p, env)
                if rc != 0:
                    self.failed.append(p.id)
                    print(f"  exited {rc}; see {p.run_dir / 'train.log'} (the sweep goes on)", flush=True)
        return "local"

    def wait(self, handle, timeout_s=None) -> None:
        return None  # submit ran everything already
