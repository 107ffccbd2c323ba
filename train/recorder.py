"""Per-epoch bookkeeping of a training run: timing, test metrics, files, checkpoints."""

from __future__ import annotations

import json
import os
import sys
import time

import keras
import numpy as np

import hvd_gradalign as hga
from hvd_gradalign import checkpoint
from train.exit_codes import EXIT_INTERRUPTED


class EpochStats(keras.callbacks.Callback):
    """Adds lr, beta, epoch_time, images_per_sec (global) and wall_time to the logs."""

    def __init__(self, global_batch: int, wall_time_before: float = 0.0):
        super().__init__()
        self.global_batch = global_batch
        self.wall_time_before = wall_time_before
        self._started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._batches = 0
        self._t_last = self._t0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        self._t_last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        opt = hga.loss_scaling.unwrap(self.model.optimizer)[1]
        train_time = max(self._t_last - self._t0, 1e-9)
        logs["lr"] = float(np.asarray(opt.learning_rate))
        # The two-pass displacement's strength: GradAlign's and the penalty's β, SAM's ρ.
        logs["beta"] = float(opt.current_strength()) if isinstance(opt, hga.TwoPassOptimizer) else 0.0
        logs["epoch_time"] = time.perf_counter() - self._t0
        logs["images_per_sec"] = self._batches * self.global_batch / train_time
        logs["wall_time"] = self.wall_time_before + time.perf_counter() - self._started


class Evaluation(keras.callbacks.Callback):
    """Evaluates named datasets at the end of every ``every``-th epoch and of the
    last one, logging ``{prefix}_{metric}`` (val_accuracy, test_loss, ...).

    At a few steps per epoch (large batches on a small training set) evaluating
    every epoch would cost more than training; epochs without an evaluation carry
    no such keys."""

    def __init__(self, datasets: dict, every: int = 1, epochs: int = 0, cut_short=lambda epoch: False):
        super().__init__()
        self.datasets = {k: v for k, v in datasets.items() if v is not None}
        self.every = every
        self.epochs = epochs
        self.cut_short = cut_short

    def due(self, epoch) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs

    def on_epoch_end(self, epoch, logs=None):
        # An epoch a signal cut short is checkpointed and finished after resuming: its
        # metrics are never recorded, and evaluating it would delay the checkpoint past
        # the grace period a scheduler or horovodrun gives (horovodrun kills after 5 s).
        if not self.due(epoch) or self.cut_short(epoch):
            return
        for prefix, data in self.datasets.items():
            results = self.model.evaluate(data, verbose=0, return_dict=True)
            for key, value in results.items():
                logs[f"{prefix}_{key}"] = float(value)


class Progress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, except that an epoch a signal cut short ends at the batch it
    reached ("53/156"), not at its planned last one ("156/156")."""

    def __init__(self, cut_short):
        super().__init__()
        self.cut_short = cut_short

    def on_epoch_end(self, epoch, logs=None):
        if self.progbar is not None and self.cut_short(epoch):
            self.progbar.update(self.seen, list((logs or {}).items()), finalize=True)
        else:
            super().on_epoch_end(epoch, logs)


class RunRecorder(keras.callbacks.Callback):
    """Writes metrics.csv / metrics.json and checkpoints (rank 0 writes; all ranks
    agree on when). Skips an epoch that a signal cut short (it is checkpointed
    mid-epoch and finished after resuming) and never checkpoints a diverged state."""

    def __init__(self, run_dir, guard: hga.StepGuard, history: list, every: int, epochs: int,
                 steps_per_epoch: int, resume_at=(0, 0), wall_time_before: float = 0.0):
        super().__init__()
        self.wall_time_before = wall_time_before
        self._started = time.perf_counter()
        self.run_dir = run_dir
        self.guard = guard
        self.history = history
        self.every = every
        self.epochs = epochs
        self.steps = steps_per_epoch
        self.resume_at = resume_at  # (epoch, batches of it done before this session)
        self.rank0 = hga.rank() == 0
        self.last_saved = None
        self.write_error = None  # the OSError (checkpoint.SaveError among them) that stopped the run

    def _batches_done(self, epoch):
        interrupted = self.guard.interrupted_at
        if interrupted is None or interrupted[0] != epoch:
            return self.steps
        # Keras counts a resumed epoch's batches from 0: add those done before.
        return interrupted[1] + (self.resume_at[1] if epoch == self.resume_at[0] else 0)

    def cut_short(self, epoch) -> bool:
        """A signal stopped ``epoch`` before its last batch."""
        return self._batches_done(epoch) < self.steps

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.diverged:
            return
        try:
            self._record(epoch, logs)
        except (OSError, checkpoint.SaveError) as err:  # rank 0's writes: a full disk, a quota, a lost mount
            self.write_error = err
        self._agree_on_write_error()

    def _record(self, epoch, logs):
        done = self._batches_done(epoch)
        if done < self.steps:
            self.save(epoch, done)
            return
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        self.history.append(row)
        if self.rank0:
            write_metrics(self.run_dir, self.history)
        if (self.every and (epoch + 1) % self.every == 0) or epoch + 1 == self.epochs \
                or self.guard.interrupted_at is not None:
            self.save(epoch + 1, 0)

    def _agree_on_write_error(self):
        """Only rank 0 writes; every worker must stop with it, or the others would wait
        for ever in the next epoch's first allreduce."""
        failed = float(self.write_error is not None)
        if hga.size() > 1:
            failed = hga.distributed.allreduce_mean_numpy([failed])[0]
        if failed > 0:
            self.model.stop_training = True
            if self.write_error is None:
                self.write_error = OSError("rank 0 could not write the run's files")

    def save(self, epoch, step):
        if self.rank0:
            # Now, not the last recorded epoch's: a cut-short epoch's time counts too.
            wall = self.wall_time_before + time.perf_counter() - self._started
            checkpoint.save(self.run_dir / "checkpoints", self.model, epoch, step,
                            history=self.history, wall_time=wall)
        self.last_saved = (epoch, step)


def best_row(history: list, key: str = "val_accuracy"):
    """The epoch with the highest ``key`` (the first of equals), or None."""
    rows = [r for r in history if isinstance(r.get(key), float) and r[key] == r[key]]
    return max(rows, key=lambda r: r[key]) if rows else None


def write_metrics(run_dir, history: list) -> None:
    keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    checkpoint.write_csv_atomic(run_dir / "metrics.csv", history, keys)
    checkpoint.write_text_atomic(run_dir / "metrics.json", json.dumps(history, indent=1))


def tensorflow_build() -> dict:
    """What computed this session, beyond the config: TensorFlow's version, whether its
    oneDNN CPU kernels are on (TF_ENABLE_ONEDNN_OPTS, read at import; they round
    differently from the Eigen ones), and the GPUs it sees."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    return {"tensorflow": tf.__version__, "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "gpus": len(tf.config.list_physical_devices("GPU"))}


def record_session(run_dir, start: int) -> None:
    """Appends this session's ``tensorflow_build`` to the run's sessions.json, with the
    epoch (federated: round) it started from: a resumed run may have been computed in
    parts on different machines or kernels. Rank 0 calls it."""
    path = run_dir / "sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else []
    sessions.append({"start": int(start), **tensorflow_build()})
    checkpoint.write_text_atomic(path, json.dumps(sessions, indent=1))


def write_summary(run_dir, status, workers, history, seconds, **extra) -> None:
    """summary.json: how the session ended (finished, interrupted, diverged), what the
    sweeps read. Rank 0 calls it."""
    summary = {"status": status, "run_dir": str(run_dir), "workers": workers, **extra,
               "epochs_done": len(history), "seconds_this_session": seconds,
               "final": history[-1] if history else None, "best_val": best_row(history)}
    checkpoint.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))


def exit_before_first_step(signal_name, run_dir, workers, history, resumed_at, **extra):
    """Ends the process on a signal that came while the first step (or round) was still
    being traced: nothing was trained since the checkpoint it resumed from
    (``resumed_at`` says which), so a re-run continues exactly where this one would have."""
    if hga.rank() == 0:
        write_summary(run_dir, "interrupted", workers, history, 0.0, **extra)
        print(f"stopped by {signal_name} before the first step of this session; nothing was trained "
              f"since {resumed_at}. Re-run the same command to resume.", flush=True)
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)
