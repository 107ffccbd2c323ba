"""The training entry point end to end: models, runs, checkpoints, signals, faults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import hvd_gradalign as hga
from hvd_gradalign import checkpoint
from hvd_gradalign.models import MODELS, build_model
from tests.conftest import HOROVODRUN, REPO, horovodrun, signal_while_tracing
from train.launch import subprocess_env

SMALL = ["--train-samples", "2048", "--test-samples", "512", "--batch-size", "256",
         "--micro-batches", "2"]


def train_cmd(run_dir, *args):
    return [sys.executable, "-m", "train", "--run-dir", str(run_dir), "--verbose", "0", *SMALL, *args]


def run_train(run_dir, *args, timeout=300):
    return subprocess.run(train_cmd(run_dir, *args), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def final_weights(run_dir):
    model, state = checkpoint.load(checkpoint.latest(Path(run_dir) / "checkpoints"))
    return model.get_weights(), state


# GroupNorm on the two deep models is opt-in (50 s): it is one layer's choice, built by
# default on the small models.
@pytest.mark.parametrize("name, norm", [
    pytest.param(name, norm, marks=[pytest.mark.slow] if (norm, name) in (("group", "resnet20"), ("group", "wrn16_4"))
                 else [], id=f"{norm}-{name}")
    for norm in ("batch", "group") for name in sorted(MODELS)])
def test_each_model_builds_and_takes_a_gradalign_step(hvd, name, norm):
    shape = (28, 28, 1) if name in ("mlp", "cnn2") else (32, 32, 3)
    model = hga.wrap(build_model(name, shape, 10, norm=norm))
    model.compile(optimizer=hga.GradAlign(keras.optimizers.SGD(0.01), beta=0.01, micro_batches=2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((4,) + shape, dtype=np.float32), rng.integers(0, 10, 4)
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["grad_variance"] > 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.output_shape == (None, 10)


def test_run_writes_its_directory_and_rerun_is_a_noop(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "--epochs", "2", "--validation-samples", "512")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 worker, global batch" in proc.stdout            # not "1 workers"
    for name in ("config.json", "metrics.csv", "metrics.json", "summary.json", "checkpoints/LATEST"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2]
    for key in ("loss", "accuracy", "val_accuracy", "test_loss", "test_accuracy", "grad_variance",
                "grad_variance_ratio", "lr", "beta", "images_per_sec", "wall_time"):
        assert key in metrics[-1], key
    assert metrics[-1]["test_accuracy"] > 0.5  # it learned something
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 2
    again = run_train(run_dir, "--epochs", "2", "--validation-samples", "512")
    assert again.returncode == 0 and "already finished" in again.stdout
    other = run_train(run_dir, "--epochs", "2", "--validation-samples", "512", "--lr", "0.1")
    assert other.returncode == 2 and "different configuration (changed: optim.lr)" in other.stderr
    # Asking a finished run (constant lr) for more epochs continues it.
    more = run_train(run_dir, "--epochs", "3", "--validation-samples", "512")
    assert more.returncode == 0 and "resuming" in more.stdout, more.stderr[-3000:]
    assert [row["epoch"] for row in json.loads((run_dir / "metrics.json").read_text())] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == 3
    # Each session says what computed it; python -m train turns TensorFlow's oneDNN
    # kernels on unless the environment says otherwise (subprocess_env passes ours on).
    sessions = json.loads((run_dir / "sessions.json").read_text())
    assert [s["start"] for s in sessions] == [0, 2]
    if "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
        assert {s["onednn"] for s in sessions} == {True}


def test_the_environment_can_keep_the_eigen_kernels_and_the_run_records_it(tmp_path):
    env = {**subprocess_env(), "TF_ENABLE_ONEDNN_OPTS": "0"}
    proc = subprocess.run(train_cmd(tmp_path / "run", "--epochs", "1"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (session,) = json.loads((tmp_path / "run" / "sessions.json").read_text())
    assert session["onednn"] is False and session["start"] == 0
    assert session["tensorflow"] == __import__("tensorflow").__version__


def test_more_epochs_under_cosine_decay_is_refused_with_the_reason(tmp_path):
    run_dir = tmp_path / "cos"
    assert run_train(run_dir, "--epochs", "1", "--decay", "cosine").returncode == 0
    more = run_train(run_dir, "--epochs", "2", "--decay", "cosine")
    assert more.returncode == 2 and "cosine learning-rate decay is spread over 1 epochs" in more.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet99"], "model.model = 'resnet99'; choose one of"),
    (["--beta", "NaN"], "optim.beta must be a finite number"),
    (["--dataset", "no_such_set", "--data-dir", "{tmp}"], "unknown dataset"),
    (["--train-samples", "70000"], "exceeds the"),
])
def test_a_failed_start_leaves_no_identity_behind(tmp_path, args, message):
    run_dir = tmp_path / "run"
    bad = run_train(run_dir, "--epochs", "1", *[a.format(tmp=tmp_path) for a in args])
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-3000:]
    assert not (run_dir / "config.json").exists()
    fixed = run_train(run_dir, "--epochs", "1")  # the corrected command, same --run-dir
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = run_train(blocker / "run", "--epochs", "1")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert f"cannot write to the run dir {blocker / 'run'}" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_sgd_baseline_and_config_errors_exit_early(tmp_path):
    proc = run_train(tmp_path / "sgd", "--epochs", "1", "--optimizer", "sgd", "--inner", "adam",
                     "--lr", "0.001", "--lr-scaling", "none", "--warmup-epochs", "2", "--subset-seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "sgd" / "metrics.json").read_text())[-1]
    assert row["beta"] == 0.0 and row["grad_variance"] > 0
    # 8 of the 16 warmup updates done: the optimizer is at half the (unscaled) peak.
    assert row["lr"] == pytest.approx(0.0005, rel=1e-6)
    assert json.loads((tmp_path / "sgd" / "config.json").read_text())["data"]["subset_seed"] == 3
    bad = run_train(tmp_path / "bad", "--batch-size", "256", "--micro-batch-size", "100")
    assert bad.returncode == 2 and "not a multiple of optim.micro_batch_size = 100" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    # lr jumps ×1e5 after epoch 1: epoch 1 is fine and checkpointed, epoch 2 diverges.
    proc = run_train(run_dir, "--epochs", "3", "--decay", "step", "--decay-epochs", "[1]",
                     "--decay-factor", "100000", "--optimizer", "sgd", "--momentum", "0.9")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "NaN or infinite" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    weights, state = final_weights(run_dir)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(np.isfinite(w).all() for w in weights)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(tmp_path):
    args = ["--epochs", "3", "--train-samples", "8192", "--batch-size", "64", "--micro-batches", "2"]
    assert run_train(tmp_path / "straight", *args).returncode == 0
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(run_dir, *args), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.json").exists():  # epoch 1 done: now inside epoch 2
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Re-run the same command to resume" in out
    _, state = final_weights(run_dir)
    assert state["epoch"] >= 1 and (state["epoch"], state["step"]) != (3, 0)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    resumed = run_train(run_dir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    a, _ = final_weights(tmp_path / "straight")
    b, state = final_weights(run_dir)
    assert (state["epoch"], state["step"]) == (3, 0)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2, 3]


def test_a_signal_during_the_first_step_ends_the_run_at_once(tmp_path):
    """Tracing the first step can outlast horovodrun's 5 s grace: a signal then ends
    the run without waiting for the step (nothing was trained yet), with a summary."""
    run_dir = tmp_path / "early"
    rc, out = signal_while_tracing(train_cmd(run_dir, "--epochs", "1", "--model", "cnn2"), "steps/epoch")
    assert rc == 75, out[-3000:]
    assert "before the first step" in out and "Re-run the same command to resume" in out
    assert not (run_dir / "checkpoints").exists()    # no step was taken, so none was saved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 0
    rerun = run_train(run_dir, "--epochs", "1", "--model", "cnn2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.horovod
def test_a_signal_to_horovodrun_during_the_first_step_is_recorded_in_its_grace(tmp_path):
    run_dir = tmp_path / "early2"
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "train",
           "--run-dir", str(run_dir), "--verbose", "0", *SMALL, "--epochs", "1", "--model", "cnn2"]
    # horovodrun's own exit code after it forwarded a signal depends on timing (a loaded
    # machine gave 0 once, though the workers exited 75); what the run owns is its record
    rc, out = signal_while_tracing(cmd, "steps/epoch")
    assert "before the first step" in out, (rc, out[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["workers"] == 2


@pytest.mark.horovod
def test_two_workers_under_horovodrun(tmp_path):
    run_dir = tmp_path / "two"
    proc = horovodrun(2, ["-m", "train", "--run-dir", run_dir, "--verbose", "2", *SMALL, "--epochs", "2"])
    assert "2 workers" in proc.stdout and "Epoch 2/2" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["workers"] == 2
    assert summary["final"]["test_accuracy"] > 0.5


def _worker_pid(run_dir, rank):
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd[1:3] == ["-m", "train"] and str(run_dir) in cmd:
            try:
                if p.environ().get("HOROVOD_RANK") == str(rank):
                    return p.pid
            except psutil.Error:
                continue
    raise AssertionError(f"no worker of rank {rank} found")


@pytest.mark.horovod
def test_worker_death_ends_the_run_in_bounded_time(tmp_path):
    run_dir = tmp_path / "death"
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "train",
           "--run-dir", str(run_dir), "--verbose", "0", *SMALL, "--epochs", "1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.json").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        victim = _worker_pid(run_dir, rank=1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        rc = proc.wait(timeout=120)
        assert rc != 0
        assert time.time() - killed_at < 120
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_an_epoch_cut_short_by_a_signal_is_not_evaluated(tmp_path):
    """The checkpoint of an interrupted epoch must not wait for validation and test
    evaluation: horovodrun kills the workers 5 s after forwarding SIGTERM."""
    from train.recorder import Evaluation, RunRecorder

    class Model:
        evaluated = 0

        def evaluate(self, data, **kwargs):
            Model.evaluated += 1
            return {"accuracy": 0.5}

    guard = hga.StepGuard(install_signal_handlers=False)
    recorder = RunRecorder(tmp_path, guard, [], every=1, epochs=3, steps_per_epoch=8)
    evaluation = Evaluation({"test": object()}, every=1, epochs=3, cut_short=recorder.cut_short)
    evaluation.set_model(Model())
    logs = {}
    evaluation.on_epoch_end(0, logs)                      # a whole epoch: evaluated
    assert Model.evaluated == 1 and logs["test_accuracy"] == 0.5
    guard.interrupted_at = (1, 3)                          # stopped after 3 of 8 batches
    logs = {}
    evaluation.on_epoch_end(1, logs)
    assert Model.evaluated == 1 and logs == {}
    guard.interrupted_at = (2, 8)                          # at the epoch's last batch: whole
    evaluation.on_epoch_end(2, logs)
    assert Model.evaluated == 2


def test_a_checkpoint_of_a_cut_short_epoch_counts_its_time(tmp_path):
    """The wall time a resumed run starts from includes the epoch a signal cut short."""
    from train.recorder import RunRecorder

    guard = hga.StepGuard(install_signal_handlers=False)
    recorder = RunRecorder(tmp_path, guard, [{"epoch": 1, "wall_time": 10.0}], every=1, epochs=3,
                           steps_per_epoch=8, wall_time_before=10.0)
    recorder.set_model(build_model("mlp", (4,), 2))
    time.sleep(0.5)                        # the cut-short epoch's work
    guard.interrupted_at = (1, 3)
    recorder.on_epoch_end(1, {})
    _, state = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    assert (state["epoch"], state["step"]) == (1, 3) and state["wall_time"] >= 10.5


def test_the_progress_bar_of_a_cut_short_epoch_ends_where_it_stopped(capsys):
    from train.recorder import Progress

    cut = {0: False, 1: True}
    progress = Progress(cut_short=lambda epoch: cut[epoch])
    progress.set_params({"verbose": 2, "epochs": 2, "steps": 156})
    for epoch, batches in ((0, 156), (1, 53)):
        progress.on_epoch_begin(epoch)
        for batch in range(batches):
            progress.on_train_batch_end(batch, {"loss": 1.0})
        progress.on_epoch_end(epoch, {"loss": 1.0})
    out = capsys.readouterr().out
    assert "156/156" in out and "53/156" in out and out.count("156/156") == 1, out


def _file_size_limit(limit):
    """preexec_fn: writes past ``limit`` bytes per file fail with OSError (EFBIG), as
    on a disk with that much room left, instead of killing the process with SIGXFSZ."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.horovod
def test_a_checkpoint_that_cannot_be_written_ends_the_run_cleanly_on_every_worker(tmp_path):
    """Epoch 1 is checkpointed; the resumed run's checkpoint at epoch 2 meets a disk
    that refuses large files. Both workers stop (no hang in the next allreduce), rank 0
    says in one line where and how much room it needs, the worker exits 74, the
    half-written folder is removed, summary.json says interrupted, and the epoch-1
    checkpoint is intact (a re-run resumes from it, as tested above)."""
    from train.launch import horovodrun_command

    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--verbose", "0", *SMALL]
    first = subprocess.run(horovodrun_command(2, ["-m", "train", *args, "--epochs", "1"]), cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "ckpt-000001-000000"
    model_bytes = (ckpt / "model.keras").stat().st_size
    assert model_bytes > 200_000  # far above every other file the run writes
    full = subprocess.run(horovodrun_command(2, ["-m", "train", *args, "--epochs", "2"]), cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=_file_size_limit(100_000))
    out = full.stdout + full.stderr
    assert full.returncode != 0 and "Exit code: 74" in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error: could not save checkpoint ckpt-000002-000000" in line]
    assert len(errors) == 1, out[-3000:]
    assert "MB needed" in errors[0] and "ckpt-000001-000000 is untouched" in errors[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["LATEST", "ckpt-000001-000000"]
    assert checkpoint.verify(ckpt) is None
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
