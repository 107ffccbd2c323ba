"""The SLURM launcher: one sbatch job array per submission, one task per pending point."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from string import Template

from sweeps import state
from sweeps.launcher import Launcher
from sweeps.spec import REPO, write_point_config
from train.exit_codes import EXIT_INTERRUPTED

TEMPLATE = REPO / "slurm" / "sweep_array.sbatch"


def require_slurm():
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the slurm launcher needs a SLURM client on this machine")


def render(sweep, points, list_file: Path, log_dir: Path, python=sys.executable) -> str:
    r = sweep.resources
    extra = []
    if r.get("partition"):
        extra.append(f"#SBATCH --partition={r['partition']}")
    if r.get("nodes"):
        extra.append(f"#SBATCH --nodes={r['nodes']}")
    if r.get("gpus_per_task"):
        extra.append(f"#SBATCH --gpus-per-task={r['gpus_per_task']}")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=f"sweep-{sweep.name}", last_index=len(points) - 1,
        max_concurrent=r["max_concurrent"], ntasks=sweep.workers, cpus_per_task=r["cpus_per_task"],
        time=r["time"], log_dir=log_dir, signal_seconds=r["signal_seconds"],
        extra_directives="\n".join(extra), point_list=list_file, python=python, repo=REPO,
        exit_interrupted=EXIT_INTERRUPTED)


def submit(sweep, points) -> str:
    """Submit ``points`` as one job array; return its job id."""
    require_slurm()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sub_dir = sweep.runs_dir / "slurm" / stamp
    sub_dir.mkdir(parents=True, exist_ok=True)
    list_file = sub_dir / "points.txt"
    list_file.write_text("".join(f"{p.run_dir.resolve()}\n" for p in points))
    for p in points:
        write_point_config(p)
    script = sub_dir / "array.sbatch"
    script.write_text(render(sweep, points, list_file, sub_dir))
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    job = out.stdout.strip().split(";")[0]
    for i, p in enumerate(points):
        state.record(p.run_dir, state="submitted", launcher="slurm", slurm_job=f"{job}_{i}",
                     submission=str(sub_dir))
    return job


def active_jobs() -> set[str]:
    """Array tasks the scheduler still holds (queued or running), as 'JOB_TASK'."""
    if shutil.which("squeue") is None:
        return set()
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode == 0 else set()


def wait(job: str, poll_s: float = 2.0, timeout_s: float | None = None) -> None:
    t0 = time.time()
    pattern = re.compile(rf"^{re.escape(job)}(_|$)")
    while any(pattern.match(j) for j in active_jobs()):
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise TimeoutError(f"job {job} still running after {timeout_s:.0f}s")
        time.sleep(poll_s)


class SlurmLauncher(Launcher):
    """One sbatch job array per submission; the scheduler runs, requeues and ends it."""

    name = "slurm"
    detached = True

    def submit(self, sweep, points, before_each=None) -> str:
        # The array's tasks run side by side: a point is seeded (if at all) before submission.
        return submit(sweep, points)

    def describe(self, handle, count) -> str:
        return f"submitted job array {handle} with {count} tasks"

    def wait(self, handle, timeout_s=None) -> None:
        wait(handle, timeout_s=timeout_s)

    def active_jobs(self) -> set[str]:
        return active_jobs()
