"""Keras 3 callbacks for Horovod training.

Horovod's own Keras callbacks use Keras-2 backend functions and do not work
with Keras 3 (their optimizer hooks are never called; upstream horovod issue
#4290); these are their replacements, built on
``hvd_gradalign.distributed``.
"""

from __future__ import annotations

import numbers

import keras

from . import distributed


class BroadcastInitialState(keras.callbacks.Callback):
    """At the start of ``fit``, copy rank ``root_rank``'s weights and optimizer
    state to every worker, so that all workers start from the same point.

    ``fit`` builds a lazily built model (a Sequential without Input, a subclassed
    model) on one sample first when this callback is in its list, so the weights
    exist here; only for generator input does the broadcast wait until the end of
    the first batch, as Horovod's own callback does."""

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank

    def on_train_begin(self, logs=None):
        self._done = distributed.size() == 1
        if not self._done and self.model.weights:
            self._broadcast()

    def on_train_batch_end(self, batch, logs=None):
        # A model that fit could not build beforehand (generator input) has its
        # weights only after the first step: Horovod's own fallback.
        if not self._done:
            self._broadcast()

    def _broadcast(self):
        model = self.model
        variables = list(model.weights)  # not dropout seeds: workers keep their own draws
        optimizer = model.optimizer
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            variables += list(optimizer.variables)
        distributed.broadcast_variables(variables, self.root_rank)
        self._done = True


class MetricAverage(keras.callbacks.Callback):
    """At the end of each epoch, replace every numeric log by its mean over
    workers, so that rank 0's progress bar, History and loggers report the
    global value. Put it before the callbacks that read the logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or distributed.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, numbers.Number)
                      or getattr(v, "shape", None) == ())
        for key, value in zip(keys, distributed.allreduce_mean_numpy([logs[k] for k in keys])):
            logs[key] = value


def _diverged(model, loss) -> bool:
    """A non-finite loss, except under dynamic loss scaling (mixed_float16): there a
    non-finite step is one the LossScaleOptimizer skipped on every worker, lowering its
    scale, and training goes on."""
    import math

    if loss is None or isinstance(getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer):
        return False
    return not math.isfinite(float(loss))


class CollectiveStop(keras.callbacks.Callback):
    """Makes stopping collective: when any worker's ``model.stop_training`` is set during
    a batch or an epoch end (stock TerminateOnNaN, EarlyStopping on local values, a user
    callback), or (``stop_on_nonfinite``) any worker's loss is not finite (except under a
    LossScaleOptimizer, which skips such steps itself), every worker
    stops after that same step, and rank 0 prints one line naming the workers and why.
    Without it the worker that stops leaves the others waiting for ever in their next
    allreduce.

    It must run after every callback that may set ``stop_training``: ``fit`` of a model
    with a Horovod optimizer on several workers appends one at the end of its callbacks
    by itself (hvd_gradalign.trainer), so users need not add it. One allreduce of
    2 × workers numbers per step and per epoch end. ``stopped`` lists (rank, reason) of
    the workers that asked for the stop, on every worker."""

    def __init__(self, stop_on_nonfinite: bool = True):
        super().__init__()
        self.stop_on_nonfinite = stop_on_nonfinite
        self.stopped = []
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._agree(logs, f"epoch {self._epoch + 1}, batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._agree(None, f"the end of epoch {epoch + 1}")

    def _agree(self, logs, where):
        loss = (logs or {}).get("loss")
        bad = self.stop_on_nonfinite and _diverged(self.model, loss)
        asked = bool(self.model.stop_training)
        n, me = distributed.size(), distributed.rank()
        flags = [0.0] * (2 * n)
        flags[me], flags[n + me] = float(asked), float(bad)
        if n > 1:
            flags = [v * n for v in distributed.allreduce_mean_numpy(flags)]
        who = [(r, "its loss is not finite" if flags[n + r] > 0.5 else "a callback set model.stop_training")
               for r in range(n) if flags[r] > 0.5 or flags[n + r] > 0.5]
        if not who:
            return
        self.model.stop_training = True
        if not self.stopped:
            self.stopped = who
            if me == 0:
                print(f"hvd_gradalign: stopping all {n} workers after {where}: "
                      + "; ".join(f"worker {r}: {why}" for r, why in who), flush=True)


class AverageModelState(keras.callbacks.Callback):
    """At the end of ``fit``, replace the model's floating-point non-trainable weights
    (BatchNorm's moving mean and variance) by their mean over workers.

    Trainable weights are identical on every worker after each step, but each worker's
    BatchNorm layers keep moving statistics of the batches it saw, so without this
    ``evaluate`` and ``predict`` after ``fit`` answer slightly differently per worker (and
    a model saved on rank 0 carries rank 0's statistics only). Validation inside ``fit``
    still uses each worker's own statistics; MetricAverage averages its results."""

    def on_train_end(self, logs=None):
        if distributed.size() == 1:
            return
        state = [v for v in self.model.non_trainable_variables if "float" in str(v.dtype)]
        if state:
            for v, mean in zip(state, distributed.allreduce_mean([v.value for v in state])):
                v.assign(mean)


def callbacks(root_rank: int = 0) -> list:
    """The callbacks every Horovod ``fit`` needs, in the order they must run."""
    return [BroadcastInitialState(root_rank), MetricAverage(), AverageModelState()]


class StopSignals:
    """Records the stop signals a job gets (SIGTERM, SIGUSR1: what SLURM sends before
    preemption or the time limit; SIGINT: Ctrl-C, which a terminal sends to every
    process of the job), for a training loop to act on at its next step boundary.

    A signal that arrives before ``step_done`` was first called calls
    ``before_first_step(signal_name)`` at once, if given: the first step traces the
    training function, which can take longer than the grace period a launcher gives
    (horovodrun kills 5 s after forwarding a signal), and nothing has been trained
    since the last checkpoint, so the caller can record the stop and exit."""

    NAMES = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, install: bool = True, before_first_step=None):
        self.received = None
        self.steps_done = 0
        self.before_first_step = before_first_step
        if install:
            import signal

            for name in self.NAMES:
                signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame):
        import signal

        self.received = signal.Signals(signum).name
        if self.steps_done == 0 and self.before_first_step is not None:
            self.before_first_step(self.received)

    def step_done(self) -> None:
        self.steps_done += 1

    def anywhere(self) -> bool:
        """Whether any worker received a signal (an allreduce with several workers,
        so every worker must call it at the same step)."""
        flag = float(self.received is not None)
        if distributed.size() > 1:
            flag = distributed.allreduce_mean_numpy([flag])[0]
        return flag > 0


class StepGuard(keras.callbacks.Callback):
    """Stops training, on every worker at the same step, when any worker's loss
    is not finite or any worker received a stop signal (see ``StopSignals``, which
    ``before_first_step`` is passed to).

    After ``fit`` returns, ``diverged`` or ``interrupted_at`` (epoch, batches done
    in that epoch) say why it stopped. The check costs one tiny allreduce per step
    with several workers."""

    def __init__(self, install_signal_handlers: bool = True, before_first_step=None):
        super().__init__()
        self.signals = StopSignals(install_signal_handlers, before_first_step)
        self.diverged = False
        self.interrupted_at = None
        self._epoch = 0

    @property
    def signal_received(self):
        return self.signals.received

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.signals.step_done()
        bad = _diverged(self.model, (logs or {}).get("loss"))
        flags = [float(self.signals.received is not None), float(bad)]
        if distributed.size() > 1:
            flags = distributed.allreduce_mean_numpy(flags)
        if flags[1] > 0:
            self.diverged = True
            self.model.stop_training = True
        elif flags[0] > 0:
            self.interrupted_at = (self._epoch, batch + 1)
            self.model.stop_training = True

    @property
    def stopped_early(self) -> bool:
        return self.diverged or self.interrupted_at is not None
