"""``python -m train``: one training run, on however many workers launched it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from train.config import typed
from train.exit_codes import EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SAVE_FAILED

def log(msg):
    import hvd_gradalign as hga

    if hga.rank() == 0:
        print(msg, flush=True)


def build_optimizer(config, steps_per_epoch, workers):
    import hvd_gradalign as hga
    from hvd_gradalign.schedules import WarmupDecay, scaled_learning_rate, warmup_start
    from train.config import warmup_updates

    c = typed(config)
    o, t = c.optim, c.train
    peak = scaled_learning_rate(o.lr, t.batch_size, o.reference_batch, o.lr_scaling)
    warmup_steps = warmup_updates(config, steps_per_epoch)
    initial = warmup_start(o.warmup_from, o.lr, peak) if warmup_steps else peak
    schedule = WarmupDecay(
        peak_lr=peak, initial_lr=initial, warmup_steps=warmup_steps, decay=o.decay,
        total_steps=t.epochs * steps_per_epoch,
        boundaries=[round(e * steps_per_epoch) for e in o.decay_epochs],
        decay_factor=o.decay_factor)
    inner = hga.make_inner(o.inner, schedule, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, global_clipnorm=o.clipnorm)
    from train.config import micro_batches_per_worker

    m = micro_batches_per_worker(config, workers)
    if o.optimizer == "gradalign":
        if o.beta_follows_lr:
            return hga.GradAlign(inner, beta_lr_ratio=o.beta / peak, micro_batches=m)
        return hga.GradAlign(inner, beta=o.beta, micro_batches=m)
    if o.optimizer == "grad_penalty":
        if o.beta_follows_lr:
            return hga.GradientPenalty(inner, strength_lr_ratio=o.beta / peak, micro_batches=m)
        return hga.GradientPenalty(inner, strength=o.beta, micro_batches=m)
    if o.optimizer == "sam":
        return hga.SAM(inner, rho=o.rho, scope=o.sam_scope, adaptive=o.sam_adaptive,
                       micro_batches=m)
    if o.log_alignment:
        # β = 0: exactly data-parallel SGD, plus the V metric from the micro-batched pass
        return hga.GradAlign(inner, beta=0.0, micro_batches=m)
    return hga.DistributedOptimizer(inner)


def build_compiled_model(config, info, steps_per_epoch, workers):
    import keras

    from hvd_gradalign.models import build_model

    m = typed(config).model
    model = build_model(m.model, info.input_shape, info.num_classes,
                        norm=None if m.norm == "default" else m.norm)
    model.compile(optimizer=build_optimizer(config, steps_per_epoch, workers),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def check_writable(run_dir: Path) -> None:
    """Fail before training, with the folder named, where results cannot be written."""
    from train.config import ConfigError

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to the run dir {run_dir} ({err.strerror}); choose another "
                          "--run-dir or fix its permissions") from None


def already_finished(config, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds this run, finished to its budget; a run dir holding a
    run that this config cannot continue is an error that says what changed."""
    from train.config import ConfigError, budget, resume_conflict

    config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
    if not config_path.exists():
        return False
    conflict = resume_conflict(json.loads(config_path.read_text()), config)
    if conflict:
        raise ConfigError(f"{run_dir} holds a run that cannot be continued with this configuration: "
                          f"{conflict} ({config_path}); choose another --run-dir or delete that folder")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return summary.get("status") == "finished" and summary.get("epochs_done", 0) >= budget(config)


def run(config) -> int:
    import hvd_gradalign as hga
    from train.config import check_batch_split, is_federated

    hga.init()
    check_batch_split(config, hga.size())
    run_dir = Path(typed(config).train.run_dir)
    if already_finished(config, run_dir):
        log(f"run already finished: {run_dir} (see {run_dir / 'summary.json'}); nothing to do")
        return EXIT_OK
    check_writable(run_dir)
    if is_federated(config):
        from train.federated_run import run_federated

        return run_federated(config, run_dir, log)
    return run_distributed(config, run_dir)


def run_distributed(config, run_dir: Path) -> int:
    import keras

    import hvd_gradalign as hga
    from hvd_gradalign import checkpoint
    from hvd_gradalign.data import make_pipelines
    from train.config import workers_phrase
    from train.recorder import exit_before_first_step, record_session, write_summary
    from train.resume import fit_remaining, restore

    workers, rank = hga.size(), hga.rank()
    c = typed(config)
    t, d = c.train, c.data
    # Everything that can fail on the configuration happens before the run leaves
    # any trace: a corrected command may then use the same --run-dir.
    pipes = make_pipelines(
        d.dataset, d.data_dir or None, rank=rank, size=workers, global_batch=t.batch_size,
        seed=t.seed, train_samples=d.train_samples, validation_samples=d.validation_samples,
        test_samples=d.test_samples, augment=d.augment, subset_seed=d.subset_seed)
    steps = pipes.steps_per_epoch

    keras.utils.set_random_seed(t.seed * 1000 + rank)
    start = restore(run_dir, t.resume, lambda: build_compiled_model(config, pipes.info, steps, workers), log)
    hga.wrap(start.model)
    if rank == 0:
        checkpoint.write_text_atomic(run_dir / "config.json", json.dumps(config, indent=1))
        record_session(run_dir, start.epoch)

    guard = hga.StepGuard(before_first_step=lambda name: exit_before_first_step(
        name, run_dir, workers, start.history, f"epoch {start.epoch}, step {start.step}",
        global_batch=t.batch_size))
    log(f"{pipes.info.name}: {pipes.train_samples} train samples, {workers_phrase(workers)}, global batch "
        f"{t.batch_size}, {steps} steps/epoch, optimizer {c.optim.optimizer}, run dir {run_dir}")
    callbacks, recorder = training_callbacks(config, run_dir, pipes, start, guard)
    t0 = time.perf_counter()
    fit_remaining(start, pipes, t.epochs, callbacks, t.verbose if rank == 0 else 0, guard)
    history = start.history

    status = "diverged" if guard.diverged else "interrupted" if guard.interrupted_at or recorder.write_error \
        else "finished"
    if rank == 0:
        try:
            write_summary(run_dir, status, workers, history, time.perf_counter() - t0, global_batch=t.batch_size)
        except OSError as err:
            recorder.write_error = recorder.write_error or err
    # Nobody leaves before rank 0 has written: a launcher that sees one task exit
    # may stop the others.
    hga.distributed.barrier()
    if recorder.write_error is not None:
        err = recorder.write_error
        if rank == 0:
            if not isinstance(err, checkpoint.SaveError):
                err = f"could not write {err.filename}: {err.strerror}; free space and re-run the same command to resume"
            print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_SAVE_FAILED
    if guard.diverged:
        print(f"error: the loss became NaN or infinite in epoch {len(history) + 1}; training stopped "
              f"and no checkpoint was written from the diverged state. Lower the learning rate "
              f"(optim.lr) or add warmup (optim.warmup_epochs).", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    if guard.interrupted_at:
        epoch_done, step_done = recorder.last_saved
        log(f"stopped by {guard.signal_received or 'a signal on another worker'}; checkpoint saved "
            f"after {epoch_done} epochs and {step_done} steps. Re-run the same command to resume.")
        return EXIT_INTERRUPTED
    log(f"finished: {run_dir}")
    return EXIT_OK


def training_callbacks(config, run_dir: Path, pipes, start, guard):
    """fit's callbacks, in the order they must run, and the recorder among them."""
    import keras

    import hvd_gradalign as hga
    from train.recorder import EpochStats, Evaluation, Progress, RunRecorder

    t = typed(config).train
    recorder = RunRecorder(run_dir, guard, start.history, t.checkpoint_every, t.epochs,
                           pipes.steps_per_epoch, resume_at=(start.epoch, start.step),
                           wall_time_before=start.wall_time)
    evaluated = {"val": pipes.validation, "test": pipes.test,
                 "train_eval": pipes.train_eval if t.eval_train else None}
    callbacks = [hga.BroadcastInitialState(), EpochStats(t.batch_size, start.wall_time),
                 Evaluation(evaluated, t.eval_every, t.epochs, recorder.cut_short), hga.MetricAverage(),
                 guard, recorder, Progress(recorder.cut_short)]
    if hga.rank() == 0:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard")))
    return callbacks, recorder


def main(argv=None) -> int:
    from hvd_gradalign.checkpoint import CheckpointError
    from train.config import ConfigError, load

    try:
        config = load(argv)
        return run(config)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
