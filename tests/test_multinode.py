"""Horovod across two SLURM nodes: two network namespaces on this machine
(tests/slurm_two_nodes.py), srun starting the workers, Gloo over the nodes' eth0."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hvd_gradalign import checkpoint
from tests import scenarios
from tests.conftest import HOROVODRUN, REPO, horovodrun
from tests.slurm_cluster import cluster_fixture
from tests.slurm_two_nodes import NODES, SUBNET, TwoNodeSlurm
from train.launch import subprocess_env

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from cluster_fixture(TwoNodeSlurm(tmp_path_factory.mktemp("two_nodes")), "a two-node cluster")


def srun(cluster, nodes, per_node, argv, timeout=600):
    env = subprocess_env(cluster.env(), HVD_GRADALIGN_RENDEZVOUS_DIR=cluster.dir / "rendezvous")
    proc = subprocess.run(["srun", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", sys.executable, *map(str, argv)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + cluster.log_tail()
    return proc


PROBE = """
import json, os
import tensorflow as tf
import hvd_gradalign as hga
hga.init()
total = hga.allreduce_mean([tf.constant(float(hga.rank()))])[0].numpy()
print(json.dumps({"node": os.uname().nodename, "rank": hga.rank(), "size": hga.size(),
                  "local_rank": hga.local_rank(), "local_size": hga.local_size(),
                  "iface": os.environ["HOROVOD_GLOO_IFACE"],
                  "rendezvous": os.environ["HOROVOD_GLOO_RENDEZVOUS_ADDR"], "mean": float(total)}), flush=True)
"""


def test_ranks_local_ranks_and_the_network_between_nodes(cluster):
    out = srun(cluster, 2, 2, ["-c", PROBE]).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1, 2, 3]
    by_node = {}
    for r in rows:
        by_node.setdefault(r["node"], []).append(r)
    assert sorted(by_node) == sorted(NODES)
    for node_rows in by_node.values():
        assert sorted(r["local_rank"] for r in node_rows) == [0, 1]
        assert all(r["local_size"] == 2 and r["size"] == 4 for r in node_rows)
    # Gloo runs over the nodes' own interface, with the rendezvous on node 1's address.
    assert {r["iface"] for r in rows} == {"eth0"}
    assert {r["rendezvous"] for r in rows} == {f"{SUBNET}.11"}
    assert all(r["mean"] == 1.5 for r in rows)


def test_gradalign_oracle_across_two_nodes(cluster, tmp_path):
    srun(cluster, 2, 1, ["tests/hvd_worker.py", tmp_path])
    for rank in (0, 1):
        result = np.load(tmp_path / f"rank{rank}.npz")
        assert int(result["size"]) == 2
        for name in [n for n in scenarios.SCENARIOS if n.startswith("ga_") and "beta0" not in n]:
            expected, _ = scenarios.oracle(name)
            got = [result[f"{name}/w{i}"] for i in range(len(expected))]
            for a, e in zip(got, expected):
                np.testing.assert_allclose(a, e, rtol=0, atol=1e-8)


TRAIN = ["-m", "train", "--verbose", "0", "--train-samples", "2048", "--test-samples", "256",
         "--batch-size", "256", "--micro-batches", "2", "--epochs", "1"]


def test_training_on_two_nodes_equals_four_workers_on_one(cluster, tmp_path):
    srun(cluster, 2, 2, [*TRAIN, "--run-dir", tmp_path / "two_nodes"])
    horovodrun(4, [*TRAIN, "--run-dir", tmp_path / "one_node"])
    summary = json.loads((tmp_path / "two_nodes" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["workers"] == 4
    a, _ = checkpoint.load(checkpoint.latest(tmp_path / "two_nodes" / "checkpoints"))
    b, _ = checkpoint.load(checkpoint.latest(tmp_path / "one_node" / "checkpoints"))
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


# Opt-in (3.5 min): the default run covers its parts apart (a SLURM job-array sweep, a
# two-node training run, a dead node resumed).
@pytest.mark.slow
def test_sweep_points_span_two_nodes_and_a_preempted_point_resumes(cluster, tmp_path):
    """Each point runs on 2 nodes ([resources] nodes = 2); USR1 (SLURM's warning before
    the time limit) checkpoints one point, its array task requeues itself, and it
    resumes, on whichever nodes the scheduler gives it."""
    from sweeps import slurm as slurm_launcher
    from sweeps import spec as sweep_spec
    from sweeps import state
    from tests.test_sweeps import submit_until_training, write_spec

    path = write_spec(tmp_path, name="twonode", batches="[64]", optimizers='["sgd"]')
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 5")
                    .replace("max_concurrent = 1", "max_concurrent = 1\nnodes = 2"))
    runs = tmp_path / "runs"
    (point,) = sweep_spec.load(path, runs).points
    env = subprocess_env(cluster.env(), HVD_GRADALIGN_RENDEZVOUS_DIR=cluster.dir / "rendezvous")
    job = submit_until_training(path, runs, point, cluster, env=env)
    nodes = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], env=env, capture_output=True, text=True)
    assert nodes.stdout.strip() in ("hgnode[1-2]", "hgnode1,hgnode2"), nodes.stdout
    signalled = subprocess.run(["scancel", "--signal=USR1", f"{job}_0"], env=env, capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    slurm_launcher.wait(job, timeout_s=600)
    log = (point.run_dir / "train.log").read_text()
    assert "stopped by SIGUSR1" in log and "resuming" in log, log[-3000:]
    summary = json.loads((point.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["workers"] == 2
    assert [row["epoch"] for row in json.loads((point.run_dir / "metrics.json").read_text())] == [1, 2, 3, 4, 5]
    assert state.point_state(point.run_dir) == state.DONE


def test_a_dead_node_ends_the_job_and_a_rerun_resumes(cluster, tmp_path):
    """SIGKILL the worker on the second node: the whole step ends in bounded time,
    and the same command resumes from the last checkpoint."""
    import signal
    import time

    import psutil

    run_dir = tmp_path / "run"
    argv = [*TRAIN, "--epochs", "6", "--run-dir", run_dir]
    env = subprocess_env(cluster.env(), HVD_GRADALIGN_RENDEZVOUS_DIR=cluster.dir / "rendezvous")
    proc = subprocess.Popen(["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, *map(str, argv)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "LATEST").exists():
            assert proc.poll() is None and time.time() < deadline, cluster.log_tail()
            time.sleep(0.2)
        victims = [p for p in psutil.process_iter(["cmdline"])
                   if str(run_dir) in " ".join(p.info["cmdline"] or []) and "-m train" in " ".join(p.info["cmdline"] or [])
                   and p.environ().get("SLURM_NODEID") == "1"]
        assert victims, "no worker found on the second node"
        for v in victims:
            v.send_signal(signal.SIGKILL)
        killed = time.time()
        rc = proc.wait(timeout=180)
        assert rc != 0 and time.time() - killed < 180
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "finished"
    rerun = srun(cluster, 2, 1, argv)
    assert "resuming" in rerun.stdout, rerun.stdout[-2000:]
    assert json.loads(summary.read_text())["status"] == "finished"


def test_horovodrun_over_ssh_across_the_nodes(cluster, tmp_path):
    """horovodrun -H, launched on node 1 as on a real cluster, starts the remote
    workers over ssh (an sshd in each node accepting the fixture's key)."""
    if cluster.ssh_key is None:
        pytest.skip("no sshd installed (scripts/setup.sh installs openssh-server)")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    hosts = ",".join(f"{n}:2" for n in NODES)
    proc = cluster.on_node(
        next(iter(NODES)),
        f"cd {REPO} && {HOROVODRUN} -np 4 -H {hosts} --gloo "
        f"--ssh-identity-file {cluster.ssh_key} {sys.executable} {script}",
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line.split(">:", 1)[1]) for line in proc.stdout.splitlines() if ">:{" in line]
    assert sorted(r["rank"] for r in rows) == [0, 1, 2, 3]
    assert {r["node"] for r in rows} == set(NODES)
    assert {r["iface"] for r in rows} == {"eth0"} and all(r["mean"] == 1.5 for r in rows)
