"""Keras 3 optimizer wrappers: Horovod data parallelism and the two-pass family
(GradAlign, SAM, the gradient-norm penalty).

They compose an inner Keras optimizer the way ``keras.optimizers.LossScaleOptimizer``
does: the inner optimizer owns the update rule and its state, the wrapper only
decides which gradient reaches it.
"""

from __future__ import annotations

import keras
from keras.src.utils import tracking

from hvd_gradalign_base.settings import (  # noqa: F401 (the names are part of this module's API)
    INNER_OPTIMIZERS,
    SAM_SCOPES,
    check_alignment_strength,
    check_micro_batches,
)

from . import displacements, distributed

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


class TwoPassOptimizer(DistributedOptimizer):
    """The base of the two-pass family: GradAlign, SAM and GradientPenalty.

    Each worker's local batch is cut into ``micro_batches`` near-equal consecutive
    slices. Every slice j gets its gradient g_j at the weights x; their mean ḡ over
    all slices of all workers is one allreduce (it also carries V, logged for every
    method). Each slice then gets a second gradient h_j on the same samples at
    x + v_j, the method's displacement (``displacement``); the mean of the h_j is a
    second allreduce and is what the inner optimizer applies to x. A strength of 0
    is plain data-parallel training (the second pass and allreduce are skipped).

    It is a DistributedOptimizer in what it shares with one (the inner optimizer, its
    learning rate, iterations and state, serialisation), not in how gradients reach
    it: the step owns both allreduces, so ``apply`` of a single gradient is refused.
    """

    def __init__(self, inner_optimizer, micro_batches=1, name=None, **kwargs):
        # The step does its own two allreduces: none of DistributedOptimizer's
        # communication options apply, so they are refused rather than ignored.
        _reject_base_kwargs(type(self).__name__, kwargs)
        super().__init__(inner_optimizer, name=name)
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise TypeError(
                f"{type(self).__name__} cannot wrap a LossScaleOptimizer: the loss scale must cover "
                "both gradient passes, so it goes outside: keras.optimizers.LossScaleOptimizer("
                f"{type(self).__name__}(inner, ...)), which compile() builds by itself under the "
                "'mixed_float16' policy.")
        self.micro_batches = check_micro_batches(micro_batches)
        self._fixed = self._lr_ratio = None

    def _set_strength(self, fixed, lr_ratio, names):
        """A fixed strength, or one that is lr_ratio × the current learning rate: exactly
        one of the two, each >= 0. ``names`` = (fixed's name, lr_ratio's name)."""
        if lr_ratio is not None and names[1] is None:
            raise ValueError(f"{type(self).__name__} takes a fixed {names[0]} only.")
        if (fixed is None) == (lr_ratio is None):
            raise ValueError(
                f"{type(self).__name__} needs exactly one of {names[0]} (a fixed value) or {names[1]} "
                f"(= ratio × learning rate), e.g. {type(self).__name__}(opt, {names[0]}=0.05)."
            )
        self._fixed = None if fixed is None else check_alignment_strength(names[0], fixed)
        self._lr_ratio = None if lr_ratio is None else check_alignment_strength(names[1], lr_ratio)

    def displacement(self, g_j, g_bar, x, strength):
        """v_j, where micro-batch j takes its second gradient (``hvd_gradalign.displacements``)."""
        raise NotImplementedError

    @property
    def is_plain_data_parallel(self) -> bool:
        """The strength is identically zero: the method reduces to data-parallel SGD."""
        return (self._fixed if self._fixed is not None else self._lr_ratio) == 0.0

    def current_strength(self):
        """The displacement's strength (β, ρ) for this update as a float64 scalar tensor
        (it follows the learning rate when a ratio is set)."""
        import tensorflow as tf

        if self._fixed is not None:
            return tf.constant(self._fixed, tf.float64)
        return tf.cast(self.inner_optimizer.learning_rate, tf.float64) * self._lr_ratio

    def apply(self, grads, trainable_variables=None):
        name = type(self).__name__
        raise RuntimeError(
            f"{name} received a single gradient per step, which would silently train as "
            f"plain large-batch SGD: this model's train_step does not reach {name}'s step "
            "(its class overrides train_step without calling super().train_step(data)). "
            f"{name} needs two gradients on each micro-batch: call "
            "`super().train_step(data)` from your train_step, or compute the update with "
            "`hvd_gradalign.two_pass_step(...)` in it (or in a custom training loop)."
        )

    def _base_config(self):
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "micro_batches": self.micro_batches}


@keras.saving.register_keras_serializable(package="hvd_gradalign")
class GradAlign(TwoPassOptimizer):
    """Exact GradAlign (Dandi, Barba, Jaggi, AAAI 2022) around an inner optimizer:
    micro-batch j takes its second gradient at x + β·(g_j − ḡ) (:class:`TwoPassOptimizer`).

    Args:
        inner_optimizer: the Keras optimizer that applies the update (SGD, Adam, ...).
        beta: fixed alignment strength β ≥ 0. β = 0 is plain data-parallel SGD
            (the second pass and allreduce are skipped).
        beta_lr_ratio: instead of ``beta``, β = ratio × the inner optimizer's
            current learning rate, so β follows a learning-rate schedule. To match
            the implicit regulariser of small-batch SGD with learning rate ε, β = ε/2.
        micro_batches: slices per worker.

    ``model.compile(optimizer=GradAlign(...))`` then ``model.fit`` runs the exact
    two-pass step (``hvd_gradalign.steps``) for any model that does not override
    ``train_step``; custom loops call ``hvd_gradalign.two_pass_step``.
    """

    def __init__(self, inner_optimizer, beta=None, micro_batches=1, beta_lr_ratio=None,
                 name=None, **kwargs):
        super().__init__(inner_optimizer, micro_batches=micro_batches, name=name, **kwargs)
        self._set_strength(beta, beta_lr_ratio, ("beta", "beta_lr_ratio"))

    beta = property(lambda self: self._fixed, doc="the fixed β, or None when it follows the lr")
    beta_lr_ratio = property(lambda self: self._lr_ratio, doc="β / lr when β follows the lr, else None")

    def displacement(self, g_j, g_bar, x, strength):
        return displacements.gradalign(g_j, g_bar, x, strength)

    def current_beta(self):
        """β for this update as a float64 scalar tensor (it follows the LR when a ratio is set)."""
        return self.current_strength()

    def get_config(self):
        return {**self._base_config(), "beta": self.beta, "beta_lr_ratio": self.beta_lr_ratio}


@keras.saving.register_keras_serializable(package="hvd_gradalign")
class GradientPenalty(TwoPassOptimizer):
    """An explicit gradient-norm penalty (β/2)·mean_j ‖g_j‖² over micro-batches, by a
    finite difference: micro-batch j takes its second gradient at x + β·g_j
    (Smith, Dherin, Barrett, De 2021; Geiping et al. 2022). Small-batch SGD with learning
    rate ε follows it with β = ε/2 on its mini-batches; GradAlign keeps only the variance
    part, so the two differ by (β/2)·‖ḡ‖².

    Args:
        inner_optimizer: the Keras optimizer that applies the update.
        strength: β ≥ 0; 0 is plain data-parallel training.
        strength_lr_ratio: instead of ``strength``, β = ratio × the current learning rate.
        micro_batches: slices per worker (the penalty is on each slice's gradient norm).
    """

    def __init__(self, inner_optimizer, strength=None, micro_batches=1, strength_lr_ratio=None,
                 name=None, **kwargs):
        super().__init__(inner_optimizer, micro_batches=micro_batches, name=name, **kwargs)
        self._set_strength(strength, strength_lr_ratio, ("strength", "strength_lr_ratio"))

    strength = property(lambda self: self._fixed, doc="the fixed β, or None when it follows the lr")
    strength_lr_ratio = property(lambda self: self._lr_ratio, doc="β / lr when β follows the lr, else None")

    def displacement(self, g_j, g_bar, x, strength):
        return displacements.grad_penalty(g_j, g_bar, x, strength)

    def get_config(self):
        return {**self._base_config(), "strength": self.strength, "strength_lr_ratio": self.strength_lr_ratio}


@keras.saving.register_keras_serializable(package="hvd_gradalign")
class SAM(TwoPassOptimizer):
    """Sharpness-aware minimisation (Foret et al. 2021) on the exact two-pass step:
    micro-batch j takes its second gradient at x + ρ·u/‖u‖.

    Args:
        inner_optimizer: the Keras optimizer that applies the update.
        rho: the neighbourhood radius ρ ≥ 0; 0 is plain data-parallel training.
        micro_batches: slices per worker.
        scope: ``"micro_batch"`` (default; m-sharpness, u = g_j, each micro-batch its
            own ascent; its mean gradient ḡ is needed only for the V log) or
            ``"global"`` (u = ḡ, the whole batch's ascent).
        adaptive: ASAM (Kwon et al. 2021): the ascent is ρ·T²u/‖Tu‖ with T = |x| + 0.01,
            a neighbourhood that scales with each weight.
    """

    def __init__(self, inner_optimizer, rho=0.05, micro_batches=1, scope="micro_batch",
                 adaptive=False, name=None, **kwargs):
        super().__init__(inner_optimizer, micro_batches=micro_batches, name=name, **kwargs)
        self._set_strength(rho, None, ("rho", None))
        if scope not in SAM_SCOPES:
            raise ValueError(f"scope must be one of {SAM_SCOPES}, got {scope!r}.")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {adaptive!r}.")
        self.scope = scope
        self.adaptive = adaptive
        rule = displacements.sam if scope == "micro_batch" else displacements.sam_global
        self._rule = rule(adaptive)

    rho = property(lambda self: self._fixed, doc="the radius ρ")

    def displacement(self, g_j, g_bar, x, strength):
        return self._rule(g_j, g_bar, x, strength)

    def get_config(self):
        return {**self._base_config(), "rho": self.rho, "scope": self.scope, "adaptive": self.adaptive}
