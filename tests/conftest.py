import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from train.launch import REPO, horovodrun_command, subprocess_env

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HOROVODRUN = Path(sys.executable).parent / "horovodrun"


def horovodrun(np_, args, timeout=600, env=None):
    """Run ``python ARGS`` on ``np_`` local workers with Gloo; fail with the output."""
    proc = subprocess.run(horovodrun_command(np_, args), cwd=REPO, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"horovodrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def hvd():
    import hvd_gradalign as hga

    hga.init()
    return hga


def signal_while_tracing(cmd, announcement):
    """Starts ``cmd``, sends SIGTERM as soon as a line of its output contains
    ``announcement`` (printed just before training: the first step is then being
    traced), and returns its exit code and output."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if announcement in line:
            proc.send_signal(signal.SIGTERM)
            break
    else:
        raise AssertionError("".join(out)[-3000:])
    out.append(proc.stdout.read())
    rc = proc.wait(timeout=120)
    return rc, "".join(out)
