"""Give an existing Keras model the GradAlign train step.

``wrap`` changes the model instance only (its train step, fit's input check,
metric reset), never its class or config, so the model saves and loads as before.
"""

from __future__ import annotations

import inspect
import warnings

import keras
import tensorflow as tf

from .optimizers import GradAlign
from .steps import first_leaf, gradalign_step, micro_batch_error

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
    """The GradAlign version of ``keras.Model.train_step``."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    compute_loss = getattr(model, "_compute_loss", model.compute_loss)

    def loss_fn(micro_batch):
        xj, yj, swj = micro_batch
        y_pred = model(xj, training=True) if model._call_has_training_arg else model(xj)
        loss = compute_loss(x=xj, y=yj, y_pred=y_pred, sample_weight=swj, training=True)
        return loss, y_pred

    result = gradalign_step(
        loss_fn, model.trainable_variables, model.optimizer, (x, y, sample_weight),
        state_variables=model.non_trainable_variables,
    )
    batch = tf.shape(first_leaf(x))[0]
    model._loss_tracker.update_state(result.loss, sample_weight=batch)
    trackers.variance.update_state(result.grad_variance)
    trackers.ratio.update_state(result.grad_variance_ratio)
    logs = model.compute_metrics(x, y, result.outputs, sample_weight=sample_weight)
    logs[GRAD_VARIANCE] = trackers.variance.result()
    logs[GRAD_VARIANCE_RATIO] = trackers.ratio.result()
    return logs


def check_fit_input(x, batch_size, micro_batches: int) -> None:
    """Reject, before training, input whose batches GradAlign cannot split."""
    if isinstance(x, tf.data.Dataset):
        spec = first_leaf(x.element_spec)
        n = None if spec is None or spec.shape.rank == 0 else spec.shape[0]
        if n is None:
            raise ValueError(
                "GradAlign needs every local batch to split into micro_batches="
                f"{micro_batches} equal slices, but this dataset's batch size is not fixed "
                "(its last batch may be partial). Batch it with "
                "dataset.batch(per_worker_batch, drop_remainder=True)."
            )
        error = micro_batch_error(int(n), micro_batches)
        if error:
            raise ValueError(f"GradAlign: {error}.")
        return
    first = first_leaf(x)
    if first is None or not hasattr(first, "shape") or isinstance(x, keras.utils.PyDataset):
        return  # generators and PyDatasets are checked at the first step
    bs = 32 if batch_size is None else int(batch_size)
    error = micro_batch_error(bs, micro_batches)
    if error:
        raise ValueError(f"GradAlign: {error}.")
    n = int(first.shape[0])
    if n % bs:
        raise ValueError(
            f"GradAlign: {n} samples with batch_size={bs} leave a last batch of {n % bs} "
            f"samples, which does not split into micro_batches={micro_batches}. Drop "
            f"{n % bs} samples (x[:{n - n % bs}]) or pass a tf.data.Dataset batched "
            "with drop_remainder=True."
        )


def wrap(model: keras.Model) -> keras.Model:
    """Return ``model`` with a train step that runs GradAlign when it is compiled
    with :class:`GradAlign` and the stock data-parallel step otherwise.

    The same model object is returned: same layers, weights and config. XLA is
    turned off for it, because Horovod's collective ops cannot be XLA-compiled.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"wrap() takes a keras.Model, got {type(model).__name__}.")
    if getattr(model, "_hvd_gradalign_wrapped", False):
        return model
    model.supports_jit = False
    if model.compiled and model.jit_compile:
        warnings.warn("hvd_gradalign.wrap: turning jit_compile off (Horovod ops are not XLA-compatible).")
        model.jit_compile = False

    trackers = _AlignmentTrackers()
    stock_train_step = model.train_step
    stock_reset_metrics = model.reset_metrics
    stock_fit = model.fit
    fit_signature = inspect.signature(stock_fit)

    def train_step(data):
        if isinstance(model.optimizer, GradAlign):
            return keras_gradalign_train_step(model, data, trackers)
        return stock_train_step(data)

    def reset_metrics():
        stock_reset_metrics()
        trackers.reset()

    def fit(*args, **kwargs):
        if isinstance(model.optimizer, GradAlign):
            bound = fit_signature.bind_partial(*args, **kwargs).arguments
            check_fit_input(bound.get("x"), bound.get("batch_size"), model.optimizer.micro_batches)
        return stock_fit(*args, **kwargs)

    # object.__setattr__ keeps these out of Keras' attribute tracking.
    for name, value in (("train_step", train_step), ("reset_metrics", reset_metrics),
                        ("fit", fit), ("_hvd_gradalign_wrapped", True),
                        ("_hvd_gradalign_trackers", trackers)):
        object.__setattr__(model, name, value)
    return model
