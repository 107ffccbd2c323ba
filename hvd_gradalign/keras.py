"""Horovod's Keras API on Keras 3: ``import hvd_gradalign.keras as hvd``.

A script written for ``horovod.tensorflow.keras`` runs with only its import line
changed. Every argument is either honoured or refused with an error that names
it; none is silently ignored. What differs from Horovod:

- ``DistributedOptimizer`` composes the optimizer (Keras 3 never calls the hooks
  Horovod's subclassing overrides; upstream horovod issue #4290).
- Sparse gradients are densified before the allreduce (``sparse_as_dense`` True or
  False gives the same numbers); ``op=Adasum``, ``process_set``, ``groups``,
  ``num_groups`` and device placement are refused.
- Checkpoints are ``.keras`` files; ``load_model`` restores the distributed optimizer.
"""

from __future__ import annotations

import keras as _keras
import numpy as _np
import tensorflow as _tf

from . import distributed as _distributed
from . import optimizers as _optimizers
from .callbacks import BroadcastInitialState as _BroadcastInitialState
from .callbacks import MetricAverage as _MetricAverage
from .optimizers import GradAlign  # noqa: F401  (one more name in the same module)

init = _distributed.init
shutdown = _distributed.shutdown
is_initialized = _distributed.is_initialized
size = _distributed.size
rank = _distributed.rank
local_size = _distributed.local_size
local_rank = _distributed.local_rank

Average, Sum, Adasum = "average", "sum", "adasum"


class Compression:
    """Gradient compression for the allreduce (Horovod's names)."""

    class none:  # noqa: N801
        name = "none"

    class fp16:  # noqa: N801
        name = "fp16"


def _refuse(name, value, default, why):
    if value != default:
        raise ValueError(f"{name}={value!r} is not supported by hvd_gradalign.keras: {why}.")


def allreduce(value, name=None, average=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
              compression=Compression.none):
    """The reduction of ``value`` over all workers (average by default)."""
    if average is not None and op is not None:
        raise ValueError("allreduce: pass average or op, not both")
    op = op or (Sum if average is False else Average)
    if op not in (Average, Sum):
        raise ValueError(f"op={op!r} is not supported by hvd_gradalign.keras: only Average and Sum.")
    x = _tf.convert_to_tensor(value) * prescale_factor
    (out,) = _distributed.allreduce_list([x], op=op, fp16=compression is Compression.fp16)
    out = out * postscale_factor
    return out.numpy() if _tf.executing_eagerly() and not _tf.is_tensor(value) else out


def allgather(value, name=None):
    return _distributed.allgather(value, name=name)


def broadcast(value, root_rank, name=None):
    return _distributed.broadcast(value, root_rank, name=name)


def broadcast_variables(variables, root_rank=0):
    _distributed.broadcast_variables(variables, root_rank)


def DistributedOptimizer(optimizer, name=None, device_dense="", device_sparse="",  # noqa: N802
                         compression=Compression.none, sparse_as_dense=False,
                         gradient_predivide_factor=1.0, op=Average, backward_passes_per_step=1,
                         average_aggregated_gradients=False, num_groups=0, groups=None,
                         process_set=None, scale_local_gradients=True):
    """Horovod's ``DistributedOptimizer`` signature over
    :class:`hvd_gradalign.DistributedOptimizer`. A :class:`GradAlign` passes through
    unchanged (it does its own allreduces)."""
    _refuse("device_dense", device_dense, "", "Keras 3 places ops itself")
    _refuse("device_sparse", device_sparse, "", "Keras 3 places ops itself")
    if op not in (Average, Sum):
        raise ValueError(f"op={op!r} is not supported by hvd_gradalign.keras: only Average and Sum "
                         "(Adasum needs an MPI build).")
    _refuse("num_groups", num_groups, 0, "all gradients go in one fused allreduce")
    _refuse("groups", groups, None, "all gradients go in one fused allreduce")
    _refuse("process_set", process_set, None, "only the global process set")
    _refuse("scale_local_gradients", scale_local_gradients, True, "there are no local variables")
    if compression not in (Compression.none, Compression.fp16):
        raise ValueError(f"compression={compression!r}: use Compression.none or Compression.fp16")
    if isinstance(optimizer, _optimizers.DistributedOptimizer):
        if isinstance(optimizer, _optimizers.TwoPassOptimizer):
            return optimizer
        raise TypeError("the optimizer is already distributed")
    del sparse_as_dense  # gradients are always allreduced dense: same numbers either way
    return _optimizers.DistributedOptimizer(
        optimizer, name=name, compression=compression.name, op=op,
        gradient_predivide_factor=gradient_predivide_factor,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients)


def load_model(filepath, custom_optimizers=None, custom_objects=None, compression=Compression.none):
    """Load a ``.keras`` model; its optimizer comes back distributed (a plain one is wrapped)."""
    objects = dict(custom_objects or {})
    for cls in custom_optimizers or ():
        objects[cls.__name__] = cls
    model = _keras.models.load_model(filepath, custom_objects=objects or None)
    opt = getattr(model, "optimizer", None)
    if opt is not None and not isinstance(opt, _optimizers.DistributedOptimizer):
        model.optimizer = DistributedOptimizer(opt, compression=compression)
        model.train_function = None
    return model


def _set_lr(optimizer, lr):
    target = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(target._learning_rate, _keras.optimizers.schedules.LearningRateSchedule):
        raise ValueError("the learning-rate callbacks set the learning rate each batch; give the "
                         "optimizer a float learning rate, not a LearningRateSchedule")
    target.learning_rate = lr


def _get_lr(optimizer):
    return float(_np.asarray(getattr(optimizer, "inner_optimizer", optimizer).learning_rate))


def _correct_momentum(optimizer, ratio):
    """Horovod's momentum correction for one step whose lr is ``ratio`` × the last
    one: scaling SGD's velocity by the ratio is the same as scaling its momentum
    coefficient for that step (Keras bakes the coefficient into the traced step)."""
    target = getattr(optimizer, "inner_optimizer", optimizer)
    for v in getattr(target, "momentums", None) or ():
        v.assign(v * ratio)


class _callbacks:  # noqa: N801  (a namespace, as horovod.tensorflow.keras.callbacks)
    class BroadcastGlobalVariablesCallback(_BroadcastInitialState):
        def __init__(self, root_rank, device=""):
            _refuse("device", device, "", "Keras 3 places ops itself")
            super().__init__(root_rank)

    class MetricAverageCallback(_MetricAverage):
        def __init__(self, device=""):
            _refuse("device", device, "", "Keras 3 places ops itself")
            super().__init__()

    class LearningRateScheduleCallback(_keras.callbacks.Callback):
        """lr = initial_lr × multiplier(epoch) for start_epoch ≤ epoch < end_epoch;
        ``multiplier`` is a number or a function of the (fractional, unless
        ``staircase``) epoch."""

        def __init__(self, initial_lr, multiplier, start_epoch=0, end_epoch=None, staircase=True,
                     momentum_correction=True, steps_per_epoch=None, verbose=0):
            super().__init__()
            self.initial_lr = float(initial_lr)
            self.multiplier = multiplier if callable(multiplier) else (lambda epoch: multiplier)
            self.start_epoch, self.end_epoch = start_epoch, end_epoch
            self.staircase = staircase
            self.momentum_correction = momentum_correction
            self.steps_per_epoch = steps_per_epoch
            self.verbose = verbose
            self._epoch = 0

        def on_train_begin(self, logs=None):
            if self.steps_per_epoch is None:
                self.steps_per_epoch = self.params.get("steps")
            if not self.staircase and not self.steps_per_epoch:
                raise ValueError("steps_per_epoch is needed when staircase=False and fit cannot tell it")

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def _in_range(self, epoch):
            return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

        def on_train_batch_begin(self, batch, logs=None):
            epoch = self._epoch if self.staircase else self._epoch + batch / self.steps_per_epoch
            if not self._in_range(self._epoch) or (self.staircase and batch != 0):
                return
            old, new = _get_lr(self.model.optimizer), self.initial_lr * self.multiplier(epoch)
            if old != new:
                if self.momentum_correction and old > 0:
                    _correct_momentum(self.model.optimizer, new / old)
                _set_lr(self.model.optimizer, new)
                if self.verbose and batch == 0 and rank() == 0:
                    print(f"Epoch {self._epoch + 1}: learning rate {new:g}")

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["lr"] = _get_lr(self.model.optimizer)

    class LearningRateWarmupCallback(LearningRateScheduleCallback):
        """Goyal et al.'s gradual warmup, as Horovod defines it: from initial_lr / size
        to initial_lr over ``warmup_epochs`` (per batch)."""

        def __init__(self, initial_lr, warmup_epochs=5, momentum_correction=True,
                     steps_per_epoch=None, verbose=0):
            n = size()

            def multiplier(epoch):
                return 1.0 / n * (epoch * (n - 1) / warmup_epochs + 1)

            super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs,
                             staircase=False, momentum_correction=momentum_correction,
                             steps_per_epoch=steps_per_epoch, verbose=verbose)
            self.warmup_epochs = warmup_epochs

        def on_epoch_end(self, epoch, logs=None):
            if epoch == self.warmup_epochs - 1:
                # The next step is the first after warmup: it runs at initial_lr.
                old = _get_lr(self.model.optimizer)
                if self.momentum_correction and old > 0:
                    _correct_momentum(self.model.optimizer, self.initial_lr / old)
                _set_lr(self.model.optimizer, self.initial_lr)
                if self.verbose and rank() == 0:
                    print(f"Epoch {epoch + 1}: finished gradual learning rate warmup to {self.initial_lr:g}.")
            super().on_epoch_end(epoch, logs)


callbacks = _callbacks
