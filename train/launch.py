"""How the tools (sweeps, benchmarks, tests) start training processes: the
environment a subprocess needs to import this repository, and horovodrun's
command line for W local workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import. On x86 CPUs without AVX-512 it
# leaves its oneDNN kernels off, and cnn2 then trains 1.4x (two-pass step) to 2x
# (data-parallel step) slower on a core (benchmarks/onednn_throughput.py). `python -m train`
# turns them on unless the environment says otherwise; each run records which it had
# (sessions.json).
ONEDNN_DEFAULT = "1"


def onednn_requested(environ=None) -> bool:
    """Whether `python -m train`, started with ``environ`` (default: this process's),
    asks TensorFlow for its oneDNN kernels."""
    value = (os.environ if environ is None else environ).get("TF_ENABLE_ONEDNN_OPTS", ONEDNN_DEFAULT)
    return value.strip().lower() in ("1", "true")


def subprocess_env(base=None, **extra) -> dict:
    """``base`` (default: this process's environment) with the repository on
    PYTHONPATH and TensorFlow's C++ start-up logging quietened."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def horovodrun_command(workers: int, argv, python=sys.executable) -> list[str]:
    """``python ARGV`` on ``workers`` local Horovod workers with Gloo (plain python for 1)."""
    command = [str(python), *map(str, argv)]
    if workers == 1:
        return command
    horovodrun = str(Path(python).parent / "horovodrun")
    return [horovodrun, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo", *command]


def quiet_tensorflow_start() -> None:
    """Import TensorFlow (and Horovod, tensorflow-datasets) with file descriptor 2
    silenced: their C++ runtimes print CUDA-probing lines on a machine without a GPU
    before any log level applies (about five lines per worker). Only start-up is
    silenced; an import error is still raised and shown. HVD_GRADALIGN_VERBOSE_START=1
    shows everything."""
    if os.environ.get("HVD_GRADALIGN_VERBOSE_START"):
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
        try:
            import horovod.tensorflow  # noqa: F401  (its C++ library logs too)
        except ImportError:
            pass  # hvd_gradalign.init() reports it when several workers need it
        import tensorflow_datasets  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
