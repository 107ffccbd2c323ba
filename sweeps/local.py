"""The local launcher: points one after another, each under horovodrun (or alone)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sweeps import state
from sweeps.spec import REPO, to_toml

STOP_GRACE_S = 120  # how long an interrupted point may take to checkpoint and exit


def point_command(point, python=sys.executable) -> list[str]:
    train = [python, "-m", "train", "--config", str(point.run_dir / "point.toml")]
    if point.workers == 1:
        return train
    horovodrun = str(Path(python).parent / "horovodrun")
    return [horovodrun, "-np", str(point.workers), "-H", f"localhost:{point.workers}", "--gloo", *train]


def write_point_config(point) -> Path:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    path = point.run_dir / "point.toml"
    path.write_text(to_toml(point.config))
    return path


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
