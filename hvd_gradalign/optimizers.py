"""Keras 3 optimizer wrappers: Horovod data parallelism and GradAlign.

Both compose an inner Keras optimizer the way ``keras.optimizers.LossScaleOptimizer``
does: the inner optimizer owns the update rule and its state, the wrapper only
decides which gradient reaches it.
"""

from __future__ import annotations

import math

import keras
from keras.src.utils import tracking

from . import distributed

_BASE_OPTIMIZER_ARGS = (
    "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps",
)


def _reject_base_kwargs(cls_name, kwargs):
    for key in kwargs:
        if key in _BASE_OPTIMIZER_ARGS:
            raise ValueError(
                f"{cls_name} does not take `{key}`; set it on the inner optimizer, "
                f"e.g. keras.optimizers.SGD(..., {key}=...)."
            )
    if kwargs:
        raise ValueError(f"{cls_name} got unexpected arguments: {sorted(kwargs)}.")


@keras.saving.register_keras_serializable(package="hvd_gradalign")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Averages gradients over all Horovod workers, then applies ``inner_optimizer``.

    Works with a stock ``keras.Model`` and ``model.fit``: the gradients that
    Keras' train step passes to ``apply`` are averaged with one fused
    ``grouped_allreduce`` before the inner update.
    """

    def __init__(self, inner_optimizer, name=None, compression="none", op="average",
                 gradient_predivide_factor=1.0, backward_passes_per_step=1,
                 average_aggregated_gradients=False, **kwargs):
        _reject_base_kwargs(type(self).__name__, kwargs)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"inner_optimizer must be a keras.optimizers.Optimizer, got {inner_optimizer!r}."
            )
        if isinstance(inner_optimizer, DistributedOptimizer):
            raise TypeError("inner_optimizer is already distributed; wrap a plain Keras optimizer.")
        if compression not in ("none", "fp16"):
            raise ValueError(f"compression must be 'none' or 'fp16', got {compression!r}.")
        if op not in ("average", "sum"):
            raise ValueError(f"op must be 'average' or 'sum', got {op!r}.")
        if gradient_predivide_factor != 1.0 and op != "average":
            raise ValueError("gradient_predivide_factor needs op='average' (as in Horovod).")
        if not float(gradient_predivide_factor) > 0:
            raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor!r}.")
        if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
                or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}.")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.compression = compression
        self.op = op
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.backward_passes_per_step = backward_passes_per_step
        self.average_aggregated_gradients = bool(average_aggregated_gradients)

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self.backward_passes_per_step > 1:
            # Local gradient sums between allreduces (Horovod's backward_passes_per_step).
            self._accumulators = [self.add_variable_from_reference(v, "hvd_accumulated")
                                  for v in var_list]
            self._passes = self.add_variable((), initializer="zeros", dtype="int64",
                                             name="hvd_backward_passes")

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def _reduce(self, grads):
        return distributed.allreduce_list(grads, op=self.op, predivide=self.gradient_predivide_factor,
                                          fp16=self.compression == "fp16")

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if self.backward_passes_per_step == 1:
            return self.apply_averaged(self._reduce(grads), trainable_variables)
        import tensorflow as tf

        self._ensure_built(trainable_variables)
        n = self.backward_passes_per_step
        for acc, g in zip(self._accumulators, grads):
            if g is not None:
                acc.assign_add(tf.convert_to_tensor(g))
        self._passes.assign_add(1)

        def communicate_and_apply():
            total = [tf.convert_to_tensor(a) / n if self.average_aggregated_gradients
                     else tf.convert_to_tensor(a) for a in self._accumulators]
            self.apply_averaged(self._reduce(total), trainable_variables)
            for acc in self._accumulators:
                acc.assign(tf.zeros_like(acc))
            return tf.constant(True)

        tf.cond(self._passes % n == 0, communicate_and_apply, lambda: tf.constant(False))

    def _ensure_built(self, trainable_variables):
        if not self.built:
            if trainable_variables is None:
                raise ValueError("Pass trainable_variables on the first call to build the optimizer.")
            self.build(list(trainable_variables))
            self.built = True

    def apply_averaged(self, grads, trainable_variables=None):
        """Apply gradients that are already averaged over all workers."""
        self._ensure_built(trainable_variables)
        self.inner_optimizer.apply(list(grads), trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError(
            f"{type(self).__name__} runs on the TensorFlow backend only (Horovod's TensorFlow ops)."
        )

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "compression": self.compression, "op": self.op,
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "backward_passes_per_step": self.backward_passes_per_step,
            "average_aggregated_gradients": self.average_aggregated_gradients,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


INNER_OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")


def make_inner(name, learning_rate, *, momentum=0.0, nesterov=False, weight_decay=0.0,
               global_clipnorm=None):
    """A Keras optimizer by name (one of INNER_OPTIMIZERS). ``weight_decay`` is the
    optimizer's own (decoupled for adamw, Keras' decay for the others)."""
    wd = weight_decay or None
    common = {"global_clipnorm": global_clipnorm or None}
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov,
                                    weight_decay=wd, **common)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=wd, **common)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, **common)
    if name == "lamb":
        return keras.optimizers.Lamb(learning_rate, weight_decay=wd, **common)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {INNER_OPTIMIZERS}")


def check_alignment_strength(name, value) -> float:
    """The rule on GradAlign's and FedGA's β (and β's ratio to the lr), in one place:
    the optimizers, the federated rounds and the training config all call it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}. A negative value "
            "displaces micro-batches the wrong way and pushes their gradients apart."
        )
    return float(value)


@keras.saving.register_keras_serializable(package="hvd_gradalign")
class GradAlign(DistributedOptimizer):
    """Exact GradAlign (Dandi, Barba, Jaggi, AAAI 2022) around an inner optimizer.

    Each worker's local batch is cut into ``micro_batches`` equal consecutive
    slices. Every slice j gets its gradient g_j at the weights x; the mean ḡ over
    all slices of all workers is one allreduce. Each slice then gets a second
    gradient h_j on the same samples at x + β·(g_j − ḡ); the mean of the h_j is a
    second allreduce and is what the inner optimizer applies to x.

    Args:
        inner_optimizer: the Keras optimizer that applies the update (SGD, Adam, ...).
        beta: fixed alignment strength β ≥ 0. β = 0 is plain data-parallel SGD
            (the second pass and allreduce are skipped).
        beta_lr_ratio: instead of ``beta``, β = ratio × the inner optimizer's
            current learning rate, so β follows a learning-rate schedule. To match
            the implicit regulariser of small-batch SGD with learning rate ε, β = ε/2.
        micro_batches: slices per worker; the local batch must be a multiple of it.

    ``model.compile(optimizer=GradAlign(...))`` then ``model.fit`` runs the exact
    two-pass step (``hvd_gradalign.steps``) for any model that does not override
    ``train_step``; custom loops call ``hvd_gradalign.gradalign_step``.
    """

    def __init__(self, inner_optimizer, beta=None, micro_batches=1, beta_lr_ratio=None,
                 name=None, **kwargs):
        # GradAlign does its own two allreduces: none of DistributedOptimizer's
        # communication options apply, so they are refused rather than ignored.
        _reject_base_kwargs(type(self).__name__, kwargs)
        super().__init__(inner_optimizer, name=name)
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise TypeError(
                "GradAlign does not support a LossScaleOptimizer inner optimizer: its two "
                "gradient passes are not loss-scaled. Train in float32 or with the "
                "'mixed_bfloat16' policy (no loss scaling needed).")
        if (beta is None) == (beta_lr_ratio is None):
            raise ValueError(
                "GradAlign needs exactly one of beta (a fixed β) or beta_lr_ratio "
                "(β = ratio × learning rate), e.g. GradAlign(opt, beta=0.05)."
            )
        self.beta = None if beta is None else check_alignment_strength("beta", beta)
        self.beta_lr_ratio = (
            None if beta_lr_ratio is None else check_alignment_strength("beta_lr_ratio", beta_lr_ratio)
        )
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}.")
        self.micro_batches = micro_batches

    @property
    def is_plain_data_parallel(self) -> bool:
        """β is identically zero: GradAlign reduces to data-parallel SGD."""
        return (self.beta if self.beta is not None else self.beta_lr_ratio) == 0.0

    def current_beta(self):
        """β for this update as a float64 scalar tensor (it follows the LR when a ratio is set)."""
        import tensorflow as tf

        if self.beta is not None:
            return tf.constant(self.beta, tf.float64)
        return tf.cast(self.inner_optimizer.learning_rate, tf.float64) * self.beta_lr_ratio

    def apply(self, grads, trainable_variables=None):
        raise RuntimeError(
            "GradAlign received a single gradient per step, which would silently train as "
            "plain large-batch SGD: this model's train_step does not reach GradAlign's step "
            "(its class overrides train_step without calling super().train_step(data)). "
            "GradAlign needs two gradients on each micro-batch: call "
            "`super().train_step(data)` from your train_step, or compute the update with "
            "`hvd_gradalign.gradalign_step(...)` in it (or in a custom training loop)."
        )

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "beta": self.beta, "beta_lr_ratio": self.beta_lr_ratio, "micro_batches": self.micro_batches,
        }
