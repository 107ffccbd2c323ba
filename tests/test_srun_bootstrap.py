"""Horovod started by srun (no horovodrun): the Gloo rendezvous from SLURM's variables.

Real srun runs in the SLURM tests; this one sets the variables srun would set."""

import subprocess
import sys
import uuid

import pytest

from hvd_gradalign import srun_bootstrap
from tests.conftest import REPO
from train.launch import subprocess_env

WORKER = """
import json, hvd_gradalign as hga, tensorflow as tf
hga.init(require_horovod=True)
out = hga.allreduce_mean([tf.constant([float(hga.rank())])])[0].numpy()
print(json.dumps({"rank": hga.rank(), "size": hga.size(), "local_rank": hga.local_rank(), "mean": float(out[0])}))
"""


def test_tasks_per_node_parsing():
    assert srun_bootstrap._tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert srun_bootstrap._tasks_per_node("4") == [4]


@pytest.mark.horovod
def test_two_tasks_rendezvous_like_srun(tmp_path):
    import json

    step = uuid.uuid4().hex[:8]
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env(), "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": step,
               "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_STEP_TASKS_PER_NODE": "2", "HVD_GRADALIGN_RENDEZVOUS_DIR": str(tmp_path)}
        for key in [k for k in env if k.startswith("HOROVOD_")]:
            del env[key]
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["size"] == 2 and r["mean"] == 0.5 for r in results)
    assert sorted(r["local_rank"] for r in results) == [0, 1]
