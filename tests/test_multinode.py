"""Horovod across two SLURM nodes: two network namespaces on this machine
(tests/slurm_two_nodes.py), srun starting the workers, Gloo over the nodes' eth0."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hvd_gradalign import checkpoint
from tests import scenarios
from tests.conftest import REPO, horovodrun
from tests.slurm_two_nodes import NODES, SUBNET, ClusterUnavailable, TwoNodeSlurm
from train.launch import subprocess_env

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TwoNodeSlurm(tmp_path_factory.mktemp("two_nodes"))
    try:
        c.start()
    except ClusterUnavailable as err:
        c.stop()
        pytest.skip(f"cannot run a two-node cluster here: {err}")
    yield c
    c.stop()


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
