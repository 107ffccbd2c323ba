"""Resuming a run, in one place: which checkpoint it continues from, and the fits
that finish an epoch a signal cut short (on exactly the batches it had left) and
then run the remaining epochs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Start:
    model: object
    epoch: int = 0                # epochs completed
    step: int = 0                 # batches completed in the next epoch (a cut epoch)
    history: list = field(default_factory=list)
    wall_time: float = 0.0


def restore(run_dir, resume: bool, build_model, log) -> Start:
    """The newest intact checkpoint of ``run_dir`` (when ``resume``), or a fresh model."""
    from hvd_gradalign import checkpoint

    ckpt = checkpoint.latest(run_dir / "checkpoints", warn=log) if resume else None
    if ckpt is None:
        return Start(build_model())
    model, state = checkpoint.load(ckpt)
    log(f"resuming {run_dir} from {ckpt.name} (epoch {state['epoch']}, step {state['step']})")
    return Start(model, state["epoch"], state["step"], state.get("history", []), state.get("wall_time", 0.0))


def fit_remaining(start: Start, pipes, epochs: int, callbacks, verbose: int, guard) -> None:
    model, epoch, steps = start.model, start.epoch, pipes.steps_per_epoch
    common = dict(callbacks=callbacks, verbose=verbose, shuffle=False)
    if start.step and epoch < epochs:
        model.fit(pipes.train_stream(epoch, start.step), epochs=epoch + 1, initial_epoch=epoch,
                  steps_per_epoch=steps - start.step, **common)
        epoch += 1
    if epoch < epochs and not guard.stopped_early:
        model.fit(pipes.train_stream(epoch), epochs=epochs, initial_epoch=epoch,
                  steps_per_epoch=steps, **common)
