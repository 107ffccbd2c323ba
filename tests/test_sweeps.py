"""Sweep specs, the local launcher, the report, and a real one-node SLURM cluster."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from sweeps import spec as sweep_spec
from sweeps import state
from sweeps.report import report
from tests.conftest import REPO
from train.config import ConfigError
from train.launch import subprocess_env
from tests.slurm_cluster import LocalSlurm, cluster_fixture

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
    return subprocess.run([sys.executable, "-m", "sweeps", *map(str, args)], cwd=REPO, env=subprocess_env(env),
                          capture_output=True, text=True, timeout=timeout)


def submit_until_training(spec, runs, point, cluster, env=None) -> str:
    """Submit ``spec`` as a SLURM job array on ``cluster`` and wait until ``point`` has
    logged an epoch; returns the job id."""
    import time

    env = env or cluster.env()
    submitted = sweeps_cli("run", spec, "--launcher", "slurm", "--runs-root", runs, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split("submitted job array ")[1].split()[0]
    deadline = time.time() + 300
    while not (point.run_dir / "metrics.json").exists():
        assert time.time() < deadline, cluster.log_tail()
        time.sleep(0.5)
    return job


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


def test_fedga_points_keep_their_beta_and_rounds_refuse_optim_optimizer(tmp_path):
    """Rounds do not read optim.optimizer: a FedGA point keeps its β, the other algorithms'
    β variants are one point, and a base config that sets optim.optimizer for rounds (it
    once zeroed FedGA's β, which made FedGA silently FedAvg) is refused, naming the key."""
    base = tmp_path / "base.toml"
    base.write_text((REPO / "train/configs/fashion_mnist_fedga.toml").read_text())
    spec = tmp_path / "fed.toml"
    spec.write_text(f'[sweep]\nname = "fed"\nbase_config = "{base}"\n'
                    '[grid]\nalgorithm = ["fedga", "fedavg"]\nbeta = [0.05, 0.1]\nseed = [0]\n')
    sweep = sweep_spec.load(spec, tmp_path / "runs")
    fedga = sorted(p.config["optim"]["beta"] for p in sweep.points if p.params["algorithm"] == "fedga")
    fedavg = [p.config["optim"]["beta"] for p in sweep.points if p.params["algorithm"] == "fedavg"]
    assert fedga == [0.05, 0.1] and fedavg == [0.0]
    base.write_text(base.read_text().replace("[optim]\n", '[optim]\noptimizer = "sgd"\n'))
    with pytest.raises(ConfigError, match="optim.optimizer = 'sgd' does nothing in a federated run"):
        sweep_spec.load(spec, tmp_path / "runs")


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


def test_spec_refuses_a_point_that_cannot_run(tmp_path):
    """Each point's resolved config gets the checks of `python -m train` at load time."""
    path = write_spec(tmp_path, batches="[256, 300]")
    path.write_text(path.read_text().replace("micro_batches = 2", "micro_batch_size = 64"))
    with pytest.raises(ConfigError, match=r"batch_size=300.*cannot run.*local batch 150.*micro_batch_size = 64"):
        sweep_spec.load(path, tmp_path / "runs")
    dry = sweeps_cli("run", path, "--dry-run", "--runs-root", tmp_path / "runs")
    assert dry.returncode == 2 and "batch_size=300" in dry.stderr and "would run" not in dry.stdout


def test_spec_refuses_a_batch_larger_than_the_data(tmp_path):
    path = write_spec(tmp_path, batches="[512, 2048]")   # 1,024 training samples
    with pytest.raises(ConfigError, match=r"batch_size=2048.*cannot run: 1024 training samples give each of "
                                          r"2 workers 512, fewer than one local batch of 1024"):
        sweep_spec.load(path, tmp_path / "runs")
    path.write_text(path.read_text().replace("train_samples = 1024", "train_samples = 0")
                    .replace("validation_samples = 256", "validation_samples = 59000"))
    with pytest.raises(ConfigError, match=r"1000 training samples give each"):   # 60,000 - 59,000
        sweep_spec.load(path, tmp_path / "runs")


def test_run_where_selects_the_points_a_launcher_takes(tmp_path):
    path, runs = write_spec(tmp_path), tmp_path / "runs"
    dry = sweeps_cli("run", path, "--dry-run", "--runs-root", runs, "--where", "batch_size=256")
    assert dry.returncode == 0, dry.stderr
    assert "3 points selected, 3 to run" in dry.stdout
    assert dry.stdout.count("would run") == 3 and "batch_size=128" not in dry.stdout
    both = sweeps_cli("run", path, "--dry-run", "--runs-root", runs, "--where", "batch_size=256",
                      "--where", "optimizer=sgd")
    assert "1 points selected" in both.stdout and both.stdout.count("would run") == 1
    for where, message in (("batch=256", "'batch' is not a grid key"), ("batch_size=333", "no point"),
                           ("batch_size", "expects KEY=VALUE")):
        bad = sweeps_cli("run", path, "--dry-run", "--runs-root", runs, "--where", where)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_spec_union_of_grids(tmp_path):
    path = write_spec(tmp_path)
    text = path.read_text()
    grid = text[text.index("[grid]"):text.index("[resources]")]
    tuning = grid.replace("[grid]", "[[grid]]")
    more_seeds = ('[[grid]]\nbatch_size = [128]\noptimizer = ["sgd"]\nlr = [0.05]\n'
                  'seed = [0, 1, 2]\n')  # seed 0 is also in the first grid: one point
    path.write_text(text.replace(grid, tuning + more_seeds))
    sweep = sweep_spec.load(path, tmp_path / "runs")
    assert len(sweep.points) == 2 * (1 + 2) + 2
    sgd128 = sorted(p.params["seed"] for p in sweep.points
                    if p.params["optimizer"] == "sgd" and p.params["batch_size"] == 128)
    assert sgd128 == [0, 1, 2]


def test_signal_seconds_reaches_the_sbatch_script(tmp_path):
    from sweeps import slurm as slurm_launcher

    path = write_spec(tmp_path)
    path.write_text(path.read_text().replace("[resources]", "[resources]\nsignal_seconds = 300"))
    sweep = sweep_spec.load(path, tmp_path / "runs")
    script = slurm_launcher.render(sweep, sweep.points, tmp_path / "list", tmp_path)
    assert "#SBATCH --signal=USR1@300" in script


def _fake_point(run_dir, *, launcher=None, summary=None, checkpoint=False):
    run_dir.mkdir(parents=True)
    if launcher is not None:
        (run_dir / "launcher.json").write_text(json.dumps(launcher))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "LATEST").write_text("ckpt-000001-000003")
    return run_dir


def test_point_state_comes_from_what_the_run_wrote(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    local = {"state": "running", "launcher": "local", "slurm_job": None, "host": host}
    cases = {
        # a local launcher that is gone (SIGKILL): the checkpoint says it can resume
        "killed_with_ckpt": ({**local, "pid": dead.pid}, None, True, state.INTERRUPTED),
        "killed_without": ({**local, "pid": dead.pid}, None, False, state.FAILED),
        "alive": ({**local, "pid": os.getpid()}, None, False, state.RUNNING),
        # horovodrun exits 1 for a run that stopped on a signal with a checkpoint
        "hvd_exit_1": ({"state": "exited", "returncode": 1}, {"status": "interrupted"}, True,
                       state.INTERRUPTED),
        "ctrl_c": ({"state": "exited", "returncode": None}, None, True, state.INTERRUPTED),
        "diverged": ({"state": "exited", "returncode": 3}, {"status": "diverged"}, True, state.FAILED),
        "crashed": ({"state": "exited", "returncode": 1}, None, False, state.FAILED),
        "slurm_gone": ({"state": "running", "slurm_job": "7_0"}, None, True, state.INTERRUPTED),
        "slurm_queued": ({"state": "submitted", "slurm_job": "7_1"}, None, False, state.RUNNING),
    }
    for name, (launcher, summary, ckpt, expected) in cases.items():
        run_dir = _fake_point(tmp_path / name, launcher=launcher, summary=summary, checkpoint=ckpt)
        assert state.point_state(run_dir, {"7_1"}) == expected, name
    # A finished run whose point now asks for more epochs is continued, not done.
    finished = _fake_point(tmp_path / "raised_budget", launcher={"state": "exited", "returncode": 0},
                           summary={"status": "finished", "epochs_done": 150}, checkpoint=True)
    assert state.point_state(finished, wanted=150) == state.DONE
    assert state.point_state(finished, wanted=300) == state.INTERRUPTED


@pytest.mark.parametrize("signum,to_group,moved", [
    ("SIGINT", True, False),
    # Opt-in (1.7 min): the same resume, reached from a launcher-only signal and a moved folder.
    pytest.param("SIGTERM", False, True, marks=pytest.mark.slow)],
    ids=["ctrl-c-to-the-group", "sigterm-to-the-launcher-only-then-a-fresh-machine"])
def test_interrupted_local_sweep_resumes(tmp_path, signum, to_group, moved):
    """Ctrl-C to the sweep's process group, or SIGTERM to the launcher alone (its
    point must not be left running as an orphan): the point is 'interrupted', not
    'running' for ever, and the next run resumes it from its checkpoint; ``moved``:
    on a fresh machine, from the checkpoint a report parked (sweeps/archive.py)."""
    import signal
    import time

    path = write_spec(tmp_path, batches="[64]", optimizers='["sgd"]')
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 6"))
    runs = tmp_path / "runs"
    (point,) = sweep_spec.load(path, runs).points
    proc = subprocess.Popen([sys.executable, "-m", "sweeps", "run", str(path), "--runs-root", str(runs)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (point.run_dir / "metrics.json").exists():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    if to_group:
        os.killpg(proc.pid, getattr(signal, signum))
    else:
        os.kill(proc.pid, getattr(signal, signum))
    proc.wait(timeout=120)
    orphans = subprocess.run(["pgrep", "-f", str(point.run_dir / "point.toml")], capture_output=True, text=True)
    assert orphans.stdout.strip() == "", "the point's training outlived its launcher"
    assert state.point_state(point.run_dir) == state.INTERRUPTED
    if moved:
        out = tmp_path / "published"
        parked = sweeps_cli("report", runs / "tiny", "--out", out, "--checkpoints")
        assert parked.returncode == 0, parked.stderr[-3000:]
        shutil.rmtree(runs)
        restored = sweeps_cli("restore", path, "--from", out, "--runs-root", runs)
        assert restored.returncode == 0 and "1 of them interrupted" in restored.stdout, restored.stderr[-3000:]
    status = sweeps_cli("status", path, "--runs-root", runs)
    assert "1 interrupted" in status.stdout, status.stdout
    again = sweeps_cli("run", path, "--runs-root", runs)
    assert again.returncode == 0, again.stdout[-3000:]
    log = (point.run_dir / "train.log").read_text()
    assert "resuming" in log, log[-3000:]
    assert state.point_state(point.run_dir) == state.DONE
    metrics = json.loads((point.run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2, 3, 4, 5, 6]


def test_two_local_launchers_share_a_sweep_without_running_a_point_twice(tmp_path):
    path = write_spec(tmp_path, batches="[64, 128, 256]", optimizers='["sgd"]')
    path.write_text(path.read_text().replace("workers = 2", "workers = 1"))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "sweeps", "run", str(path), "--runs-root", str(runs)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    points = sweep_spec.load(path, runs).points
    ran = [line.split()[1] for o in outs for line in o.splitlines()
           if line.startswith("[") and "skipped" not in line]
    assert sorted(ran) == sorted(p.id for p in points), outs
    for p in points:
        assert state.point_state(p.run_dir) == state.DONE
        assert [row["epoch"] for row in json.loads((p.run_dir / "metrics.json").read_text())] == [1]
        assert "resuming" not in (p.run_dir / "train.log").read_text()


def test_local_sweep_runs_resumes_and_reports(tmp_path):
    path = write_spec(tmp_path, batches="[256]", optimizers='["gradalign"]')
    # 70000 training samples pass the spec's checks but not the dataset's (60000 minus
    # validation): those points fail when they run, and the others must not care.
    path.write_text(path.read_text().replace("seed = [0]", "seed = [0]\ntrain_samples = [1024, 70000]"))
    runs = tmp_path / "runs"
    status = sweeps_cli("status", path, "--runs-root", runs)
    assert status.stdout.count("pending") >= 4
    first = sweeps_cli("run", path, "--launcher", "local", "--runs-root", runs)
    assert first.returncode == 1, first.stderr[-3000:]
    sweep = sweep_spec.load(path, runs)
    states = {p.id: state.point_state(p.run_dir) for p in sweep.points}
    for p in sweep.points:
        assert states[p.id] == (state.DONE if p.params["train_samples"] == 1024 else state.FAILED)
    dry = sweeps_cli("run", path, "--dry-run", "--runs-root", runs)
    would = [line for line in dry.stdout.splitlines() if "would run" in line]
    assert len(would) == 2 and all("train_samples=70000" in line and "[failed]" in line for line in would)
    result = report(runs / "tiny")
    with open(runs / "tiny" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"done", "failed"}
    done = [r for r in rows if r["status"] == "done"]
    # what the points ran: 2 workers, 2 micro-batches of 64 each (256 / 2 / 2)
    assert {(r["workers"], r["micro_batches"], r["micro_batch_size"]) for r in done} == {("2", "2", "64")}
    assert "| 256 |" in result["table"] and "not finished" in result["table"]
    for name in ("test_accuracy_vs_batch.png", "grad_variance_vs_batch.png", "throughput_vs_batch.png",
                 "gap_vs_batch.png"):
        assert (runs / "tiny" / name).stat().st_size > 1000


def test_predecessor_is_the_longest_finished_shorter_run_of_the_same_settings(tmp_path):
    import copy

    from sweeps.extend import predecessors

    runs = tmp_path / "runs"
    sweep = sweep_spec.load(write_spec(tmp_path, batches="[256]", optimizers='["sgd"]'), runs)
    point = sweep.points[0]
    point.config["train"]["epochs"] = 10

    def finished(name, epochs, *, done=None, workers=2, status="finished", checkpoint=True, **optim):
        d = runs / "tiny" / name
        (d / "checkpoints").mkdir(parents=True)
        config = copy.deepcopy(point.config)
        config["train"].update(epochs=epochs, run_dir=str(d))
        config["optim"].update(optim)
        (d / "config.json").write_text(json.dumps(config))
        (d / "summary.json").write_text(json.dumps({"status": status, "workers": workers,
                                                    "epochs_done": epochs if done is None else done}))
        if checkpoint:
            (d / "checkpoints" / "LATEST").write_text("ckpt-1")

    finished("four", 4)
    finished("six", 6)
    finished("other_lr", 8, lr=0.1)
    finished("longer", 12)
    finished("one_worker", 9, workers=1)
    finished("cut_short", 9, done=7, status="interrupted")
    finished("no_checkpoint", 8, checkpoint=False)
    finished(".other.copying", 9)  # a copy in the making (hidden) is nobody's predecessor
    pending = {p.id: state.PENDING for p in sweep.points}
    assert predecessors(sweep, pending) == {point.id: (runs / "tiny" / "six", 6)}
    assert predecessors(sweep, {p.id: state.INTERRUPTED for p in sweep.points}) == {}
    # The copy is the point's own run, not finished: its config, its budget still ahead.
    from sweeps.extend import continue_from_predecessor
    from sweeps.report import collect

    assert continue_from_predecessor(point, (runs / "tiny" / "six", 6))
    # what predecessors() said is re-checked under the point's lock: a seeded point is not seeded again
    assert not continue_from_predecessor(point, (runs / "tiny" / "four", 4))
    assert json.loads((point.run_dir / "config.json").read_text()) == point.config
    assert state.point_state(point.run_dir) == state.INTERRUPTED
    assert json.loads((runs / "tiny" / "six" / "summary.json").read_text())["status"] == "finished"
    assert not (runs / "tiny" / f".{point.id}.copying").exists()
    rows = {r["id"]: r for r in collect(runs / "tiny", "final")}
    assert rows[point.run_dir.name]["status"] == "interrupted" and rows[point.run_dir.name]["continued_from"] == "six"
    # Under cosine decay the longer run is not the shorter one continued.
    point.config["optim"]["decay"] = "cosine"
    finished("cosine", 5, decay="cosine")
    assert predecessors(sweep, pending) == {}


# Opt-in (1.4 min): test_one_launcher_continues_a_shorter_run_that_it_finished_itself runs
# the same continuation by default.
@pytest.mark.slow
def test_a_raised_budget_continues_the_shorter_finished_run(tmp_path):
    """Raising a point's epochs makes it a new point; it starts from a copy of the finished
    shorter run, ends where a straight run ends, and leaves the shorter run as it was."""
    path = write_spec(tmp_path, batches="[256]", optimizers='["sgd"]')
    text = path.read_text().replace("workers = 2", "workers = 1")
    path.write_text(text)
    runs = tmp_path / "runs"
    assert sweeps_cli("run", path, "--runs-root", runs).returncode == 0
    short = sweep_spec.load(path, runs).points[0]
    path.write_text(text.replace("epochs = 1\n", "epochs = 2\n"))
    longer = sweep_spec.load(path, runs).points[0]
    assert longer.id != short.id
    assert f"(continues {short.id} after 1 epochs)" in sweeps_cli("status", path, "--runs-root", runs).stdout
    run = sweeps_cli("run", path, "--runs-root", runs)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert f"{longer.id} continues {short.id} after 1 epochs (a copy; that run stays)" in run.stdout
    assert "resuming" in (longer.run_dir / "train.log").read_text()
    rows = json.loads((longer.run_dir / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == json.loads((short.run_dir / "metrics.json").read_text())[0]
    assert json.loads((short.run_dir / "summary.json").read_text())["epochs_done"] == 1
    assert json.loads((longer.run_dir / "config.json").read_text())["train"]["run_dir"] == str(longer.run_dir)
    copied = json.loads((longer.run_dir / "continued_from.json").read_text())
    assert copied["run"] == short.id and copied["epochs_done"] == 1 and copied["wall_time"] == rows[0]["wall_time"]
    result = report(runs / "tiny")
    row = next(r for r in result["rows"] if r["id"] == longer.id)
    assert row["continued_from"] == short.id
    assert row["own_wall_time"] == pytest.approx(rows[1]["wall_time"] - rows[0]["wall_time"])
    assert state.point_state(longer.run_dir, wanted=2) == state.DONE
    assert "0 to run" in sweeps_cli("run", path, "--runs-root", runs).stdout
    assert sweeps_cli("run", path, "--runs-root", tmp_path / "straight").returncode == 0
    straight = json.loads((tmp_path / "straight" / "tiny" / longer.id / "metrics.json").read_text())
    for key in ("loss", "test_accuracy", "val_accuracy"):
        assert rows[1][key] == pytest.approx(straight[1][key], rel=1e-5), key


def test_status_estimates_the_remaining_time_from_the_sweeps_own_rates(tmp_path):
    """Seconds per epoch measured per cost (optimizer, batch, ...), not per lr, β or seed;
    a continued run's rate from its own part; interrupted points count what is left;
    points with nothing comparable measured are named, not guessed."""
    from sweeps.estimate import describe, remaining
    from train.config import budget

    path = write_spec(tmp_path)
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 4").replace("seed = [0]", "seed = [0, 1]"))
    runs = tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)

    def point(optimizer, batch, beta=0.0, seed=0):
        return next(p for p in sweep.points if p.params["optimizer"] == optimizer and p.params["batch_size"] == batch
                    and p.params["beta"] == beta and p.params["seed"] == seed)

    def ran(p, epochs, wall, status):
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "config.json").write_text(json.dumps(p.config))
        (p.run_dir / "metrics.json").write_text(json.dumps(
            [{"epoch": e, "wall_time": wall * e / epochs} for e in range(1, epochs + 1)]))
        (p.run_dir / "summary.json").write_text(json.dumps({"status": status, "epochs_done": epochs, "workers": 2}))
        (p.run_dir / "checkpoints").mkdir()
        (p.run_dir / "checkpoints" / "LATEST").write_text("ckpt")

    ran(point("sgd", 128), 4, 40.0, "finished")
    # its last 2 epochs were its own, in 10 s: 5 s an epoch, not 10
    (point("sgd", 128).run_dir / "continued_from.json").write_text(
        json.dumps({"run": "x", "epochs_done": 2, "wall_time": 30.0}))
    ran(point("gradalign", 128, 0.025), 1, 30.0, "interrupted")
    states = {p.id: state.point_state(p.run_dir, wanted=budget(p.config)) for p in sweep.points}
    left = remaining(sweep, states)
    # sgd@128 seed 1: 4 x 5 s; gradalign@128 at 30 s an epoch: 3 epochs left + 3 points x 4
    assert left.seconds == pytest.approx(4 * 5 + 30 * (3 + 3 * 4))
    assert left.points == 11 and sorted(p.params["batch_size"] for p in left.unmeasured) == [256] * 6
    assert "still to run: 11 points, about 0.1 h of one launcher plus 6 with no measured rate" in describe(left)
    # a pending point that continues a run needs only the epochs past that run's
    continued = {point("sgd", 128, seed=1).id: (tmp_path / "elsewhere", 3)}
    assert remaining(sweep, states, continued).seconds == pytest.approx(left.seconds - 3 * 5)
    status = sweeps_cli("status", path, "--runs-root", runs)
    assert "still to run: 11 points" in status.stdout, status.stdout + status.stderr
    # how far a point that is not done got
    line = next(x for x in status.stdout.splitlines() if point("gradalign", 128, 0.025).id in x)
    assert line.startswith("interrupted") and line.endswith("(epoch 1 of 4)"), line
    assert "none with a measured rate yet" in describe(remaining(sweep_spec.load(path, tmp_path / "empty"), {
        p.id: state.PENDING for p in sweep.points}))


def test_status_costs_points_at_the_rate_of_the_kernels_they_will_run_on(tmp_path, monkeypatch):
    """A run whose sessions are recorded is measured over its last session, under that
    session's kernels; points still to run take the rate of the kernels `python -m train`
    will ask for (TF_ENABLE_ONEDNN_OPTS, on by default), else any measured rate."""
    from sweeps.estimate import measured_rates, remaining
    from train.config import budget

    path = write_spec(tmp_path, optimizers='["sgd"]')
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 10").replace("seed = [0]", "seed = [0, 1, 2]"))
    sweep = sweep_spec.load(path, tmp_path / "runs")
    at_128 = [p for p in sweep.points if p.params["batch_size"] == 128]

    def ran(p, seconds_per_epoch, sessions):
        """10 epochs, epoch e taking seconds_per_epoch[e - 1]; ``sessions``: (start, oneDNN)."""
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "config.json").write_text(json.dumps(p.config))
        walls = [sum(seconds_per_epoch[:e]) for e in range(1, 11)]
        (p.run_dir / "metrics.json").write_text(json.dumps([{"epoch": e, "wall_time": walls[e - 1]}
                                                             for e in range(1, 11)]))
        (p.run_dir / "sessions.json").write_text(json.dumps([{"start": s, "onednn": on} for s, on in sessions]))
        (p.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "epochs_done": 10}))

    # Eigen for 4 epochs at 9 s, then resumed on oneDNN at 3 s: its rate is the last session's
    ran(at_128[0], [9.0] * 4 + [3.0] * 6, [(0, False), (4, True)])
    ran(at_128[1], [8.0] * 10, [(0, False)])
    rates = measured_rates(sweep.runs_dir)
    key = next(iter(rates))[0]
    assert rates == {(key, True): pytest.approx(3.0), (key, False): pytest.approx(8.0)}
    states = {p.id: state.point_state(p.run_dir, wanted=budget(p.config)) for p in sweep.points}
    left = [p for p in sweep.points if states[p.id] != state.DONE and p.params["batch_size"] == 128]
    assert len(left) == 1
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert remaining(sweep, states).seconds == pytest.approx(10 * 3.0)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert remaining(sweep, states).seconds == pytest.approx(10 * 8.0)
    # measured under neither: the median of what was
    shutil.rmtree(at_128[1].run_dir)
    states = {p.id: state.point_state(p.run_dir, wanted=budget(p.config)) for p in sweep.points}
    assert remaining(sweep, states).seconds == pytest.approx(2 * 10 * 3.0)


def fake_run(d, *, lr=0.1, val=0.8, test=0.8, optimizer="sgd", beta=0.0, batch=64, data=None, seed=0, epochs=1):
    """A finished run folder as `python -m train` leaves it, with one evaluated epoch."""
    d.mkdir(parents=True)
    config = {"data": {"dataset": "x", **(data or {})}, "model": {"model": "mlp"},
              "optim": {"optimizer": optimizer, "inner": "sgd", "micro_batches": 4 if beta else 1, "lr": lr,
                        "lr_scaling": "none", "warmup_epochs": 0.0, "beta": beta},
              "train": {"batch_size": batch, "seed": seed, "epochs": epochs}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps({"status": "finished"}))
    (d / "metrics.json").write_text(json.dumps([{"epoch": 1, "accuracy": 0.9, "loss": 0.3, "val_accuracy": val,
                                                 "test_accuracy": test, "images_per_sec": 1.0,
                                                 "grad_variance": 1.0}]))


def test_report_selects_on_validation_not_test(tmp_path):
    runs = tmp_path / "runs"
    for i, (lr, val, test) in enumerate([(0.1, 0.90, 0.70), (0.2, 0.80, 0.95)]):
        fake_run(runs / f"p{i}", lr=lr, val=val, test=test)
    result = report(runs)
    assert "| 70.00 (lr=0.1" in result["table"]


@pytest.mark.parametrize("order", [(0.2, 0.1), (0.1, 0.2)])
def test_an_exact_tie_on_validation_goes_to_the_smaller_setting_in_any_order(order):
    """β 0.1 and β 0.2 at full batch both read 4,478 of 5,000 validation images: the
    smaller β is chosen whichever was read first (before, the first one read won); a
    strictly better value still wins, and a setting without β sorts after the numbers."""
    from sweeps.selection import best_setting

    run = lambda val, seed=0: {"seed": seed, "val_accuracy": val}
    tie = {(0.05, beta): [run(4478 / 5000)] for beta in order}
    assert best_setting(tie, "val_accuracy", max) == (0.05, 0.1)
    assert best_setting({**tie, (0.05, 0.4): [run(4479 / 5000)]}, "val_accuracy", max) == (0.05, 0.4)
    assert best_setting({(0.05, None): [run(0.8)], (0.05, 0.1): [run(0.8)]}, "val_accuracy", max) == (0.05, 0.1)
    losses = {(lr, 0.0): [{"seed": 0, "train_loss": 0.3}] for lr in (0.4, 0.2)}
    assert best_setting(losses, "train_loss", min) == (0.2, 0.0)


def test_one_launcher_continues_a_shorter_run_that_it_finished_itself(tmp_path):
    """Both budgets in one spec, both pending when the launcher starts: the longer point
    is seeded when its turn comes, from the shorter run the same launcher just finished."""
    path = write_spec(tmp_path, batches="[256]", optimizers='["sgd"]')
    path.write_text(path.read_text().replace("workers = 2", "workers = 1").replace("epochs = 1\n", "")
                    .replace("seed = [0]\n", "seed = [0]\nepochs = [1, 2]\n"))
    runs = tmp_path / "runs"
    short, longer = sorted(sweep_spec.load(path, runs).points, key=lambda p: p.params["epochs"])
    run = sweeps_cli("run", path, "--runs-root", runs)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert f"{longer.id} continues {short.id} after 1 epochs (a copy; that run stays)" in run.stdout
    assert json.loads((longer.run_dir / "continued_from.json").read_text())["run"] == short.id
    rows = json.loads((longer.run_dir / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == json.loads((short.run_dir / "metrics.json").read_text())[0]


def test_report_reads_each_batch_at_one_budget_and_never_counts_budgets_as_seeds(tmp_path):
    """A raised budget leaves the same setting and seed at 600 and at 1,200 epochs: not 2
    seeds of one setting. Each batch is read at the budget most of its finished runs have
    (the larger on a tie), and the table says which runs it left out."""
    from sweeps.report import batch_budgets

    runs = tmp_path / "runs"
    first = [(0.1, 600, 0.88, 0.86), (0.2, 600, 0.86, 0.85), (0.1, 1200, 0.90, 0.87)]
    for lr, epochs, val, test in first:
        fake_run(runs / f"lr{lr}e{epochs}", lr=lr, epochs=epochs, val=val, test=test, batch=8192)
    fake_run(runs / "small", batch=128, val=0.9, test=0.88, epochs=150)
    table = report(runs)["table"]
    assert "| 8192 | 86.00 (lr=0.1, warmup 0, 600 epochs, n=1) |" in table
    assert "1 finished run(s) at another budget (batch 8192: 1 at 1200 epochs)" in table
    assert len(list(csv.DictReader(open(runs / "results.csv")))) == 4
    for lr, val in ((0.2, 0.87), (0.05, 0.85)):
        fake_run(runs / f"lr{lr}e1200", lr=lr, epochs=1200, val=val, test=0.5, batch=8192)
    table = report(runs)["table"]
    assert "| 8192 | 87.00 (lr=0.1, warmup 0, 1200 epochs, n=1) |" in table
    assert "(batch 8192: 2 at 600 epochs)" in table
    done = lambda b, e: {"status": "done", "batch_size": b, "epochs": e}
    assert batch_budgets([done(64, 100), done(64, 200), done(32, 5)]) == {64: 200, 32: 5}


def test_cells_give_a_spread_only_where_there_are_two_values_or_more():
    """One seed's spread is unknown, not 0: its cell prints the mean alone."""
    from sweeps.selection import mean_pm

    assert mean_pm([0.86, 0.88]) == "87.00 ± 1.41"
    assert mean_pm([0.86, None, float("nan")]) == "86.00"
    assert mean_pm([1.5, -0.5], scale=1, sign="+") == "+0.50 ± 1.41"
    assert mean_pm([None]) == "–"


def test_last_mean_reads_the_average_of_the_last_evaluations_not_a_spike(tmp_path):
    """A noisy curve: a validation spike at epoch 3, then 12 evaluations around a plateau.
    best_val reads the spike; last_mean reads the mean of the last 10 evaluations (rows
    without a test evaluation take no part), and the table says how it was read."""
    from sweeps.selection import TAIL, pick_epoch

    spike = {"epoch": 3, "val_accuracy": 0.99, "test_accuracy": 0.50, "loss": 1.0}
    plateau = [{"epoch": 4 + i, "val_accuracy": 0.80 + 0.01 * (i % 2), "test_accuracy": 0.70 + 0.01 * i,
                "loss": 0.5} for i in range(12)]
    history = [spike] + plateau + [{"epoch": 16, "loss": 0.4}]
    assert pick_epoch(history, "best_val") == spike
    tail = plateau[-TAIL:]
    read = pick_epoch(history, "last_mean")
    assert read["epoch"] == 15 and read["test_accuracy"] == pytest.approx(sum(r["test_accuracy"] for r in tail) / TAIL)
    assert read["val_accuracy"] == pytest.approx(0.805)
    runs = tmp_path / "runs"
    fake_run(runs / "p0")
    (runs / "p0" / "metrics.json").write_text(json.dumps([{**r, "accuracy": 0.9, "grad_variance": 1.0}
                                                         for r in history[:-1]]))
    table = report(runs, at="last_mean")["table"]
    assert f"| {100 * read['test_accuracy']:.2f} (" in table
    assert f"averaged over the last {TAIL} evaluations" in table


def test_recovery_table_gives_the_difference_its_standard_error_and_the_gap_recovered(tmp_path):
    """SGD@64 91 %, SGD@256 82 ± 2.83 %, GradAlign@256 87 ± 1.41 % (2 seeds each): the
    difference +5.00 with SE √(1.41²/2 + 2.83²/2) = 2.24, and 5 of the 9 points lost: 56 %."""
    runs = tmp_path / "runs"
    points = [("sgd", 64, [0.90, 0.92]), ("sgd", 256, [0.80, 0.84]), ("gradalign", 256, [0.86, 0.88])]
    for optimizer, batch, tests in points:
        for seed, test in enumerate(tests):
            fake_run(runs / f"{optimizer}{batch}s{seed}", optimizer=optimizer, batch=batch, test=test, seed=seed,
                     beta=0.1 if optimizer == "gradalign" else 0.0)
    table = report(runs)["table"]
    assert "| 256 | 82.00 ± 2.83 (n=2) | 87.00 ± 1.41 (n=2) | +5.00 ± 2.24 | 56 % |" in table


def test_report_chooses_on_the_first_subset_and_applies_it_to_the_second(tmp_path):
    """On subset B the lr that validates best is 0.2; the report must still show the lr
    chosen on subset A (0.1): subset B plays no part in any choice."""
    import matplotlib.pyplot as plt

    runs = tmp_path / "runs"
    points = [(0, 0.1, 0.90, 0.70), (0, 0.2, 0.80, 0.95), (1, 0.1, 0.70, 0.60), (1, 0.2, 0.99, 0.99)]
    width = lambda name: plt.imread(runs / name).shape[1]
    for i, (subset, lr, val, test) in enumerate(points):
        fake_run(runs / f"p{i}", lr=lr, val=val, test=test, data={"train_samples": 100, "subset_seed": subset})
        if i == 1:
            report(runs)
            one_subset = {name: width(name) for name in ("test_accuracy_vs_batch.png", "gap_vs_batch.png")}
    result = report(runs)
    # the curves get a panel per subset, side by side: subset B is drawn, not only tabled
    assert all(width(name) == 2 * w for name, w in one_subset.items())
    a, b = result["table"].split("### subset_seed 1")
    assert "### subset_seed 0 (every setting chosen here)" in a and "| 70.00 (lr=0.1" in a
    assert "| 60.00 (lr=0.1" in b and "99.00" not in b
    rows = list(csv.DictReader(open(runs / "results.csv")))
    assert sorted(r["subset_seed"] for r in rows) == ["0", "0", "1", "1"]


def test_report_gap_needs_a_clean_train_accuracy_and_lists_points_not_started(tmp_path):
    """Keras' running training accuracy trails the model (a negative gap on short runs):
    the gap is shown only where the run evaluated its training set. With --spec,
    results.csv has a row for every point, started or not."""
    path, runs = write_spec(tmp_path, batches="[128]", optimizers='["sgd"]'), tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)
    d = runs / "tiny" / sweep.points[0].id
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(sweep.points[0].config))
    (d / "summary.json").write_text(json.dumps({"status": "finished", "workers": 2, "epochs_done": 1}))
    row = {"epoch": 1, "accuracy": 0.60, "loss": 0.3, "val_accuracy": 0.7, "test_accuracy": 0.71,
           "images_per_sec": 1.0, "grad_variance": 1.0}
    (d / "metrics.json").write_text(json.dumps([row]))
    assert "gap " not in report(runs / "tiny")["table"].split("Cells:")[0]
    (d / "metrics.json").write_text(json.dumps([{**row, "train_eval_accuracy": 0.75}]))
    assert "(train 75.00, gap +4.00; " in report(runs / "tiny")["table"]
    path.write_text(path.read_text().replace("[128]", "[128, 256]"))
    proc = sweeps_cli("report", runs / "tiny", "--spec", path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(runs / "tiny" / "results.csv")))
    assert sorted((r["batch_size"], r["status"]) for r in rows) == [("128", "done"), ("256", "pending")]


def test_report_plots_the_beta_curve_at_every_gradalign_batch(tmp_path):
    runs = tmp_path / "runs"
    points = [(b, "sgd", 0.0, 0.80) for b in (512, 2048)] + [
        (b, "gradalign", beta, acc) for b in (512, 2048) for beta, acc in ((0.05, 0.82), (0.2, 0.85))]
    for i, (batch, optimizer, beta, acc) in enumerate(points):
        fake_run(runs / f"p{i}", optimizer=optimizer, beta=beta, batch=batch, val=acc, test=acc)
    result = report(runs)
    import matplotlib.image

    beta_plot = runs / "accuracy_vs_beta.png"
    assert beta_plot in result["plots"]
    height, width = matplotlib.image.imread(beta_plot).shape[:2]
    assert width > 1.8 * height  # one panel per batch, side by side


# ---- a real SLURM scheduler ------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from cluster_fixture(LocalSlurm(tmp_path_factory.mktemp("slurm")), "a local SLURM cluster")


@pytest.mark.slurm
def test_slurm_job_array_sweep(tmp_path, slurm):
    path = write_spec(tmp_path, name="onslurm", batches="[256]", optimizers='["sgd"]')
    # 70000 training samples pass the spec's checks but not the dataset's: that point fails.
    path.write_text(path.read_text().replace("seed = [0]", "seed = [0]\ntrain_samples = [1024, 70000]"))
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

    states = {p.params["train_samples"]: state.point_state(p.run_dir) for p in sweep.points}
    logs = "\n".join((p.run_dir / "train.log").read_text()[-2000:] for p in sweep.points
                     if (p.run_dir / "train.log").exists())
    assert states == {1024: state.DONE, 70000: state.FAILED}, logs + slurm.log_tail()
    good = next(p for p in sweep.points if p.params["train_samples"] == 1024)
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
                                                      if p.params["train_samples"] == 70000).resolve())]

    result = report(runs / "onslurm")
    assert "| 256 |" in result["table"]


FEDERATED_SPEC = """
[sweep]
name = "{name}"
base_config = "{repo}/train/configs/fashion_mnist_fedga.toml"
workers = {workers}
[fixed]
model = "mlp"
train_samples = 600
validation_samples = 200
test_samples = 200
clients = 5
clients_per_round = 3
local_steps = 2
local_batch = 20
rounds = 2
eval_rounds = 1
split = "dirichlet"
verbose = 0
[[grid]]
algorithm = ["scaffold", "fedga"]
seed = [0]
"""


# Opt-in (2 min): the default run has the SLURM job-array sweep and the local federated
# sweep; this one joins them.
@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_federated_sweep_on_two_workers_equals_one_worker_locally(tmp_path, slurm):
    """Federated points as a SLURM job array, 2 srun tasks each (clients 0, 2, 4 on rank 0,
    1, 3 on rank 1), give the rounds that one local worker computes."""
    runs = tmp_path / "runs"
    finals = {}
    for workers, launcher, env in ((2, "slurm", slurm.env()), (1, "local", None)):
        path = tmp_path / f"fed{workers}.toml"
        path.write_text(FEDERATED_SPEC.format(name=f"fed{workers}", repo=REPO, workers=workers))
        run = sweeps_cli("run", path, "--launcher", launcher, "--wait", "--runs-root", runs, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + slurm.log_tail()
        for point in sweep_spec.load(path, runs).points:
            summary = json.loads((point.run_dir / "summary.json").read_text())
            assert summary["status"] == "finished" and summary["workers"] == workers
            rows = json.loads((point.run_dir / "metrics.json").read_text())
            assert [r["round"] for r in rows] == [1, 2]
            finals[workers, point.params["algorithm"]] = rows[-1]
    for algorithm in ("scaffold", "fedga"):
        one, two = finals[1, algorithm], finals[2, algorithm]
        for key in ("train_loss", "test_loss", "val_loss", "grad_variance"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), (algorithm, key)
    assert "| dirichlet(0.1) |" in report(runs / "fed2")["table"]


@pytest.mark.slurm
@pytest.mark.slow  # 3.5 min; tests/test_multinode.py runs the same path on two nodes by default
def test_slurm_preemption_signal_checkpoints_requeues_and_resumes(tmp_path, slurm):
    """USR1 (what --signal sends before the time limit) stops the point with a
    checkpoint; the array task requeues itself and the training resumes."""
    path = write_spec(tmp_path, name="preempt", batches="[64]", optimizers='["sgd"]')
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 6"))
    runs = tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)
    (point,) = sweep.points
    job = submit_until_training(path, runs, point, slurm)
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


def test_a_new_config_section_does_not_rename_existing_points():
    """Run dirs and sweep points are named by a hash of the config: a distributed
    run's identity must not change because the [federated] section now exists."""
    import copy

    from train.config import DEFAULTS

    config = copy.deepcopy(DEFAULTS)
    without = {s: v for s, v in config.items() if s != "federated"}
    assert sweep_spec.point_id(config, 2) == sweep_spec.point_id(without, 2)
    config["federated"]["algorithm"] = "fedavg"
    assert sweep_spec.point_id(config, 2) != sweep_spec.point_id(without, 2)


def test_keys_added_later_at_their_old_value_rename_nothing():
    """A federated run made before the server optimizer keys existed keeps its name; the
    committed federated sweep's first point is the run dir its report was made from."""
    import copy

    from train.config import ADDED_LATER, DEFAULTS

    config = copy.deepcopy(DEFAULTS)
    config["federated"]["algorithm"] = "fedavg"
    before = copy.deepcopy(config)
    for section, key in ADDED_LATER:
        # At the defaults each is at its old value, or, like warmup_from without a
        # warmup, computes nothing different.
        assert config[section][key] == ADDED_LATER[section, key] or (section, key) == ("optim", "warmup_from")
        del before[section][key]
    assert sweep_spec.point_id(config, 1) == sweep_spec.point_id(before, 1)
    config["federated"]["server_optimizer"] = "adam"
    assert sweep_spec.point_id(config, 1) != sweep_spec.point_id(before, 1)
    sweep = sweep_spec.load(REPO / "sweeps/configs/fashion_mnist_federated.toml")
    assert sweep.points[0].id == "2ed55b45fefc"


@pytest.mark.parametrize("setting, message", [("server_lr = [0.0]", "federated.server_lr must be > 0"),
                                              ("alpha = [0.0]", "federated.alpha must be > 0")])
def test_a_federated_setting_that_cannot_run_is_refused_before_anything_is_written(tmp_path, setting, message):
    """The library's federated rules reach `python -m train` and sweep specs before a run
    directory exists (they used to pass the early check and fail inside the run)."""
    runs = tmp_path / "runs"
    spec = tmp_path / "fed.toml"
    spec.write_text(f'[sweep]\nname = "fed"\nbase_config = "train/configs/fashion_mnist_fedga.toml"\n'
                    f'[fixed]\nsplit = "dirichlet"\n[grid]\n{setting}\nseed = [0]\n')
    with pytest.raises(ConfigError, match=message):
        sweep_spec.load(spec, runs)
    dry = sweeps_cli("run", spec, "--runs-root", runs)
    assert dry.returncode == 2 and message in dry.stderr and not runs.exists()
    key, value = setting.split(" = ")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "train/configs/fashion_mnist_fedga.toml",
                           "--split", "dirichlet", f"--{key.replace('_', '-')}", value.strip("[]"),
                           "--run-dir", str(run_dir)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and not run_dir.exists(), proc.stderr[-2000:]


def test_gradient_variance_is_not_drawn_over_a_single_micro_batch():
    """With one worker and one micro-batch V is rounding error (1e-11 at batch 128 here),
    which a log axis would draw ten decades under every other point; two micro-batches on
    any worker layout give a V to draw."""
    from sweeps.report import _grad_variance

    row = lambda workers, micro: {"workers": workers, "micro_batches": micro, "grad_variance": 0.5}
    assert _grad_variance(row(1, 1)) is None
    assert _grad_variance(row(2, 1)) == _grad_variance(row(1, 2)) == 0.5
