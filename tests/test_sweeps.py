"""Sweep specs, the local launcher, the report, and a real one-node SLURM cluster."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps import spec as sweep_spec
from sweeps import state
from sweeps.report import report
from tests.conftest import REPO
from tests.slurm_cluster import ClusterUnavailable, LocalSlurm
from train.config import ConfigError

TINY = """
[sweep]
name = "{name}"
base_config = "train/configs/fashion_mnist.toml"
workers = 2
[fixed]
epochs = 1
train_samples = 1024
test_samples = 256
validation_samples = 256
micro_batches = 2
warmup_epochs = 0.0
verbose = 0
[grid]
batch_size = {batches}
optimizer = {optimizers}
lr = [0.05]
beta = ["lr/2", 0.1]
seed = [0]
[resources]
time = "00:10:00"
max_concurrent = 1
"""


def write_spec(tmp_path, name="tiny", batches="[128, 256]", optimizers='["sgd", "gradalign"]'):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name, batches=batches, optimizers=optimizers))
    return path


def sweeps_cli(*args, env=None, timeout=900):
    env = {**(env or os.environ), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "sweeps", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_spec_points_rules_and_stable_ids(tmp_path):
    sweep = sweep_spec.load(write_spec(tmp_path), tmp_path / "runs")
    # sgd: the β values collapse into one point per batch; gradalign: lr/2 and 0.1
    assert len(sweep.points) == 2 * (1 + 2)
    betas = sorted(p.params["beta"] for p in sweep.points if p.params["optimizer"] == "gradalign")
    assert betas == [0.025, 0.025, 0.1, 0.1]
    assert all(p.params["beta"] == 0.0 for p in sweep.points if p.params["optimizer"] == "sgd")
    again = sweep_spec.load(write_spec(tmp_path), tmp_path / "runs")
    assert [p.id for p in again.points] == [p.id for p in sweep.points]
    assert len({p.id for p in sweep.points}) == len(sweep.points)
    assert all(p.run_dir.parent == tmp_path / "runs" / "tiny" for p in sweep.points)


@pytest.mark.parametrize("edit, match", [
    (("lr = [0.05]", "learning_rate = [0.05]"), "unknown training key 'learning_rate'"),
    (('beta = ["lr/2", 0.1]', 'beta = ["half"]'), "beta rule 'half'"),
    (("[resources]", "[resources]\ngpu = 1"), "unknown key resources.gpu"),
    (("workers = 2", "workers = 2\nwrokers = 3"), r"unknown keys in \[sweep\]"),
    (("lr = [0.05]", "lr = []"), "grid.lr must be a non-empty list"),
])
def test_spec_errors(tmp_path, edit, match):
    path = write_spec(tmp_path)
    path.write_text(path.read_text().replace(*edit))
    with pytest.raises(ConfigError, match=match):
        sweep_spec.load(path, tmp_path / "runs")


def test_local_sweep_runs_resumes_and_reports(tmp_path):
    path = write_spec(tmp_path, batches="[256, 250]", optimizers='["gradalign"]')
    runs = tmp_path / "runs"
    status = sweeps_cli("status", path, "--runs-root", runs)
    assert status.stdout.count("pending") >= 4
    first = sweeps_cli("run", path, "--launcher", "local", "--runs-root", runs)
    # batch 250 does not split into 2 workers x 2 micro-batches: those points fail, the others finish
    assert first.returncode == 1, first.stderr[-3000:]
    sweep = sweep_spec.load(path, runs)
    states = {p.id: state.point_state(p.run_dir) for p in sweep.points}
    for p in sweep.points:
        assert states[p.id] == (state.DONE if p.params["batch_size"] == 256 else state.FAILED)
    dry = sweeps_cli("run", path, "--dry-run", "--runs-root", runs)
    would = [line for line in dry.stdout.splitlines() if "would run" in line]
    assert len(would) == 2 and all("batch_size=250" in line and "[failed]" in line for line in would)
    result = report(runs / "tiny")
    with open(runs / "tiny" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"done", "failed"}
    assert "| 256 |" in result["table"] and "not finished" in result["table"]
    for name in ("test_accuracy_vs_batch.png", "grad_variance_vs_batch.png", "throughput_vs_batch.png"):
        assert (runs / "tiny" / name).stat().st_size > 1000


def test_report_selects_on_validation_not_test(tmp_path):
    runs = tmp_path / "runs"
    for i, (lr, val, test) in enumerate([(0.1, 0.90, 0.70), (0.2, 0.80, 0.95)]):
        d = runs / f"p{i}"
        d.mkdir(parents=True)
        config = {"data": {"dataset": "x"}, "model": {"model": "mlp"},
                  "optim": {"optimizer": "sgd", "inner": "sgd", "micro_batches": 1, "lr": lr,
                            "lr_scaling": "none", "warmup_epochs": 0.0, "beta": 0.0},
                  "train": {"batch_size": 64, "seed": 0, "epochs": 1}}
        (d / "config.json").write_text(json.dumps(config))
        (d / "summary.json").write_text(json.dumps({"status": "finished"}))
        (d / "metrics.json").write_text(json.dumps([{"epoch": 1, "accuracy": 0.9, "loss": 0.3,
                                                     "val_accuracy": val, "test_accuracy": test,
                                                     "images_per_sec": 1.0, "grad_variance": 1.0}]))
    result = report(runs)
    assert "70.00 ± 0.00" in result["table"] and "lr=0.1" in result["table"]


# ---- a real SLURM scheduler ------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as err:
        cluster.stop()
        pytest.skip(f"cannot run a local SLURM cluster here: {err}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.mark.slurm
def test_slurm_job_array_sweep(tmp_path, slurm):
    path = write_spec(tmp_path, name="onslurm", batches="[256, 250]", optimizers='["sgd"]')
    runs = tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)
    assert len(sweep.points) == 2

    submitted = sweeps_cli("run", path, "--launcher", "slurm", "--runs-root", runs, env=slurm.env())
    assert submitted.returncode == 0, submitted.stderr + slurm.log_tail()
    assert "submitted job array" in submitted.stdout
    status = sweeps_cli("status", path, "--runs-root", runs, env=slurm.env())
    assert "2 running" in status.stdout or "1 running" in status.stdout, status.stdout
    job = submitted.stdout.split("submitted job array ")[1].split()[0]
    from sweeps import slurm as slurm_launcher

    slurm_launcher.wait(job, timeout_s=600)

    states = {p.params["batch_size"]: state.point_state(p.run_dir) for p in sweep.points}
    logs = "\n".join((p.run_dir / "train.log").read_text()[-2000:] for p in sweep.points
                     if (p.run_dir / "train.log").exists())
    assert states == {256: state.DONE, 250: state.FAILED}, logs + slurm.log_tail()
    good = next(p for p in sweep.points if p.params["batch_size"] == 256)
    summary = json.loads((good.run_dir / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["status"] == "finished"  # 2 srun tasks, one Horovod job
    launcher = json.loads((good.run_dir / "launcher.json").read_text())
    assert launcher["launcher"] == "slurm" and launcher["returncode"] == 0

    status = sweeps_cli("status", path, "--runs-root", runs, env=slurm.env())
    assert "1 done, 0 running, 1 failed" in status.stdout

    # Re-running submits only what is not done: the failed point, and it fails again.
    again = sweeps_cli("run", path, "--launcher", "slurm", "--wait", "--runs-root", runs, env=slurm.env())
    assert "1 to run" in again.stdout and again.returncode == 1, again.stdout + again.stderr
    lists = sorted((runs / "onslurm" / "slurm").glob("*/points.txt"))
    assert len(lists) == 2
    assert lists[-1].read_text().split() == [str(next(p.run_dir for p in sweep.points
                                                      if p.params["batch_size"] == 250).resolve())]

    result = report(runs / "onslurm")
    assert "| 256 |" in result["table"]


@pytest.mark.slurm
def test_slurm_preemption_signal_checkpoints_requeues_and_resumes(tmp_path, slurm):
    """USR1 (what --signal sends before the time limit) stops the point with a
    checkpoint; the array task requeues itself and the training resumes."""
    import time

    path = write_spec(tmp_path, name="preempt", batches="[64]", optimizers='["sgd"]')
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 6"))
    runs = tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)
    (point,) = sweep.points
    submitted = sweeps_cli("run", path, "--launcher", "slurm", "--runs-root", runs, env=slurm.env())
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split("submitted job array ")[1].split()[0]
    deadline = time.time() + 300
    while not (point.run_dir / "metrics.json").exists():
        assert time.time() < deadline, slurm.log_tail()
        time.sleep(0.5)
    signalled = subprocess.run(["scancel", "--signal=USR1", f"{job}_0"], env=slurm.env(),
                               capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    from sweeps import slurm as slurm_launcher

    slurm_launcher.wait(job, timeout_s=600)
    log = (point.run_dir / "train.log").read_text()
    assert "stopped by SIGUSR1" in log, log[-3000:]
    assert "resuming" in log, log[-3000:]
    summary = json.loads((point.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished", log[-3000:]
    metrics = json.loads((point.run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2, 3, 4, 5, 6]
    assert state.point_state(point.run_dir) == state.DONE
