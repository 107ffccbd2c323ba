"""hvd_gradalign: large-batch data-parallel Keras 3 training on Horovod, with GradAlign."""

from .callbacks import AverageModelState, BroadcastInitialState, CollectiveStop, MetricAverage, StepGuard, StopSignals, callbacks
from . import loss_scaling
from .distributed import (
    allreduce_mean,
    broadcast_variables,
    init,
    is_horovod_active,
    local_rank,
    local_size,
    rank,
    size,
)
from .optimizers import (
    INNER_OPTIMIZERS,
    SAM,
    DistributedOptimizer,
    GradAlign,
    GradientPenalty,
    TwoPassOptimizer,
    make_inner,
)
from .schedules import WarmupDecay, scaled_learning_rate
from .steps import GradAlignResult, gradalign_gradients, gradalign_step, two_pass_gradients, two_pass_step
from .trainer import GRAD_VARIANCE, GRAD_VARIANCE_RATIO, install, wrap

# compile(optimizer=GradAlign(...)) + fit is enough: Keras' trainer dispatches to
# the GradAlign step from now on (and behaves as before for other optimizers).
install()

__version__ = "0.1.0"

__all__ = [
    "AverageModelState", "BroadcastInitialState", "CollectiveStop", "loss_scaling", "DistributedOptimizer", "GRAD_VARIANCE", "GRAD_VARIANCE_RATIO",
    "GradAlign", "GradAlignResult", "GradientPenalty", "INNER_OPTIMIZERS", "SAM", "TwoPassOptimizer",
    "two_pass_gradients", "two_pass_step", "make_inner", "MetricAverage", "StepGuard", "StopSignals", "allreduce_mean", "broadcast_variables",
    "callbacks", "gradalign_gradients", "gradalign_step", "init", "is_horovod_active",
    "install", "local_rank", "local_size", "rank", "scaled_learning_rate", "size", "WarmupDecay", "wrap",
]
