"""Keras 3 callbacks for Horovod training.

Horovod's own Keras callbacks use Keras-2 backend functions and do not work
with Keras 3 (design.md); these are their replacements, built on
``hvd_gradalign.distributed``.
"""

from __future__ import annotations

import numbers

import keras

from . import distributed


class BroadcastInitialState(keras.callbacks.Callback):
    """At the start of ``fit``, copy rank ``root_rank``'s weights and optimizer
    state to every worker, so that all workers start from the same point."""

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank

    def on_train_begin(self, logs=None):
        if distributed.size() == 1:
            return
        model = self.model
        variables = list(model.weights)  # not dropout seeds: workers keep their own draws
        optimizer = model.optimizer
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            variables += list(optimizer.variables)
        distributed.broadcast_variables(variables, self.root_rank)


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


def callbacks(root_rank: int = 0) -> list:
    """The callbacks every Horovod ``fit`` needs, in the order they must run."""
    return [BroadcastInitialState(root_rank), MetricAverage()]
