"""The local launcher: points one after another, each under horovodrun (or alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sweeps import state
from sweeps.spec import REPO, to_toml


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
    state.record(point.run_dir, state="running", launcher="local", log=str(log), slurm_job=None)
    with open(log, "a") as out:
        rc = subprocess.run(point_command(point), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    state.record(point.run_dir, state="exited", returncode=rc)
    return rc
