"""How a Keras model reaches the GradAlign train step.

``model.compile(optimizer=GradAlign(...))`` is enough: on import the library
installs a dispatch into Keras' TensorFlow trainer (the class every
``keras.Model`` inherits ``train_step``, ``fit`` and ``reset_metrics`` from) that
runs the two-pass step, checks fit's input and turns XLA off whenever the
model's optimizer is a two-pass one (GradAlign, SAM, GradientPenalty), and does
exactly what Keras does otherwise.
A model class that overrides ``train_step`` without calling ``super()`` never
reaches it; GradAlign.apply then stops it at the first step with an error
(it must never train silently as plain large-batch SGD).

``wrap(model)`` is the explicit form: it makes sure the dispatch is installed,
turns XLA off and drops a train function Keras may already have built.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import keras
import tensorflow as tf

from .callbacks import BroadcastInitialState, CollectiveStop
from .optimizers import TwoPassOptimizer
from . import distributed, keras_internals, loss_scaling
from .steps import first_leaf, two_pass_step

GRAD_VARIANCE = "grad_variance"
GRAD_VARIANCE_RATIO = "grad_variance_ratio"


class _AlignmentTrackers:
    """Epoch means of V and V/‖ḡ‖², kept off Keras' attribute tracking so that
    they never enter the model's saved state."""

    def __init__(self):
        self.variance = keras.metrics.Mean(name=GRAD_VARIANCE)
        self.ratio = keras.metrics.Mean(name=GRAD_VARIANCE_RATIO)

    def reset(self):
        self.variance.reset_state()
        self.ratio.reset_state()


def keras_gradalign_train_step(model: keras.Model, data, trackers: _AlignmentTrackers):
    """The two-pass (GradAlign, SAM, GradientPenalty) version of ``keras.Model.train_step``."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    compute_loss = keras_internals.compute_loss(model)
    with_training = keras_internals.call_has_training_arg(model)

    def loss_fn(micro_batch):
        xj, yj, swj = micro_batch
        y_pred = model(xj, training=True) if with_training else model(xj)
        loss = compute_loss(x=xj, y=yj, y_pred=y_pred, sample_weight=swj, training=True)
        return loss, y_pred

    result = two_pass_step(
        loss_fn, model.trainable_variables, model.optimizer, (x, y, sample_weight),
        state_variables=model.non_trainable_variables,
    )
    batch = tf.shape(first_leaf(x))[0]
    keras_internals.loss_tracker(model).update_state(result.loss, sample_weight=batch)
    # An update skipped for a non-finite gradient (mixed_float16) has no V to average in.
    counted = tf.cast(result.finite, result.grad_variance.dtype)
    trackers.variance.update_state(tf.where(result.finite, result.grad_variance, 0.0), sample_weight=counted)
    trackers.ratio.update_state(tf.where(result.finite, result.grad_variance_ratio, 0.0), sample_weight=counted)
    logs = model.compute_metrics(x, y, result.outputs, sample_weight=sample_weight)
    logs[GRAD_VARIANCE] = trackers.variance.result()
    logs[GRAD_VARIANCE_RATIO] = trackers.ratio.result()
    return logs


def local_steps(x, batch_size, validation_split: float = 0.0, steps_per_epoch=None):
    """The number of steps ``fit`` will take per epoch on this worker, or None where
    it cannot be known before training (a generator, a dataset of unknown size)."""
    if steps_per_epoch:
        return int(steps_per_epoch)
    if isinstance(x, tf.data.Dataset):
        n = int(x.cardinality())
        return n if n >= 0 else None
    if isinstance(x, keras.utils.PyDataset):
        try:
            return len(x)
        except (TypeError, NotImplementedError):
            return None
    first = first_leaf(x)
    if first is None or not hasattr(first, "shape"):
        return None
    total = int(first.shape[0])
    # Keras' own rule (keras.src.trainers.data_adapters.data_adapter_utils.train_validation_split).
    n = int(math.floor(total * (1.0 - validation_split))) if validation_split else total
    return math.ceil(n / (32 if batch_size is None else int(batch_size)))


def check_equal_steps(steps) -> None:
    """Refuse, before training, workers that would take different numbers of steps per
    epoch: the first to run out of batches would leave the others waiting for ever in
    an allreduce. Collective: every worker calls it at the start of fit."""
    if distributed.size() == 1:
        return
    known, count, square = distributed.allreduce_mean_numpy(
        [steps is not None, steps or 0, (steps or 0) ** 2])
    if known < 1.0 or square == count ** 2:
        return  # all equal (the mean of the squares is the square of the mean), or unknowable
    raise ValueError(
        f"the {distributed.size()} workers would take different numbers of steps per epoch (this "
        f"worker {steps}, {count:g} on average): the first to run out of batches would leave the "
        "others waiting for ever. Give every worker the same number of samples (drop the "
        "remainder when sharding, as hvd_gradalign.data.shard does) or pass the same "
        "steps_per_epoch to fit on every worker.")


def _trackers(model) -> _AlignmentTrackers:
    trackers = model.__dict__.get("_hvd_gradalign_trackers")
    if trackers is None:
        trackers = _AlignmentTrackers()
        # object.__setattr__ keeps it out of Keras' attribute tracking (and saved state).
        object.__setattr__(model, "_hvd_gradalign_trackers", trackers)
    return trackers


def _method(model):
    """The model's optimizer, seen through a LossScaleOptimizer (mixed_float16)."""
    return loss_scaling.unwrap(getattr(model, "optimizer", None))[1]


def _is_two_pass(model) -> bool:
    return isinstance(_method(model), TwoPassOptimizer)


def _uses_horovod(model) -> bool:
    from .optimizers import DistributedOptimizer

    return isinstance(_method(model), DistributedOptimizer)


def _no_xla(model) -> None:
    if model.jit_compile:
        warnings.warn("hvd_gradalign: turning jit_compile off (Horovod ops are not XLA-compatible).")
        model.jit_compile = False
        model.train_function = None


def _build_from_input(model, x) -> None:
    """Build a lazily built model (a Sequential without Input, a subclassed model)
    on one sample of fit's input before training. GradAlign's step takes the
    variable list before its first forward pass, and the initial broadcast needs
    the variables to exist when training begins."""
    if model.built or x is None:
        return
    if isinstance(x, tf.data.Dataset):
        x = next(iter(x))
        x = keras.utils.unpack_x_y_sample_weight(x)[0] if isinstance(x, tuple) else x
    elif isinstance(x, keras.utils.PyDataset) or not hasattr(first_leaf(x), "shape"):
        return  # generators: Keras builds the model in its first step
    model(tf.nest.map_structure(lambda t: t[:1], x), training=False)


def _with_collective_stop(signature, model, args, kwargs):
    """fit's arguments with a CollectiveStop last among its callbacks (where it sees every
    stop_training the others set), unless the caller put one there."""
    bound = signature.bind(model, *args, **kwargs)
    given = list(bound.arguments.get("callbacks") or [])
    if not any(isinstance(c, CollectiveStop) for c in given):
        bound.arguments["callbacks"] = given + [CollectiveStop()]
    return bound.args[1:], bound.kwargs


_TRAINER = None  # the Keras class that defines train_step / fit / reset_metrics


trainer_class = keras_internals.trainer_class


def install() -> None:
    """Install the GradAlign dispatch into Keras' trainer (idempotent)."""
    global _TRAINER
    loss_scaling.install()
    if _TRAINER is not None:
        return
    owner = trainer_class()
    stock_train_step, stock_fit, stock_reset = owner.train_step, owner.fit, owner.reset_metrics
    fit_signature = inspect.signature(stock_fit)

    def train_step(self, data):
        if _is_two_pass(self):
            return keras_gradalign_train_step(self, data, _trackers(self))
        return stock_train_step(self, data)

    def fit(self, *args, **kwargs):
        bound = fit_signature.bind_partial(self, *args, **kwargs).arguments
        horovod = _uses_horovod(self)
        if horovod or any(isinstance(c, BroadcastInitialState) for c in bound.get("callbacks") or ()):
            # Built before training begins, so that the initial broadcast has weights to send.
            _build_from_input(self, bound.get("x"))
        if horovod:
            _no_xla(self)
            check_equal_steps(local_steps(bound.get("x"), bound.get("batch_size"),
                                          bound.get("validation_split") or 0.0, bound.get("steps_per_epoch")))
            if distributed.size() > 1:
                args, kwargs = _with_collective_stop(fit_signature, self, args, kwargs)
        try:
            return stock_fit(self, *args, **kwargs)
        except Exception:
            # A step that failed while being traced (a wrong input shape, say) leaves a
            # train function Keras would reuse and that can never run again: drop it, as
            # wrap() does, so that the next fit traces afresh (plain Keras recovers too).
            if _is_two_pass(self):
                self.train_function = None
            raise

    def reset_metrics(self):
        stock_reset(self)
        trackers = self.__dict__.get("_hvd_gradalign_trackers")
        if trackers is not None:
            trackers.reset()

    for name, fn, stock in (("train_step", train_step, stock_train_step), ("fit", fit, stock_fit),
                            ("reset_metrics", reset_metrics, stock_reset)):
        functools.update_wrapper(fn, stock)
        setattr(owner, name, fn)
    _TRAINER = owner


def wrap(model: keras.Model) -> keras.Model:
    """Return ``model`` ready for GradAlign / Horovod training: the explicit form of
    what ``compile`` + ``fit`` do by themselves. XLA is turned off (Horovod's
    collective ops cannot be XLA-compiled) and any train function Keras already
    built (e.g. by a ``fit`` that failed) is dropped, so the next ``fit`` uses the
    GradAlign step. Works on compiled, fitted and loaded models alike.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"wrap() takes a keras.Model, got {type(model).__name__}.")
    install()
    model.supports_jit = False
    if model.compiled:
        _no_xla(model)
    model.train_function = None
    return model
