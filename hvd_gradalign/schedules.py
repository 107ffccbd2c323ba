"""Learning-rate scaling and schedules (Goyal et al. 2017: linear scaling + warmup)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

SCALING_RULES = ("linear", "sqrt", "none")
DECAYS = ("constant", "step", "cosine")
# Where a warmup starts: "zero" (the usual meaning) or "lr", the learning rate tuned at the
# reference batch (Goyal et al. 2017: from the small-batch rate to the scaled peak).
WARMUP_STARTS = ("zero", "lr")


def warmup_start(warmup_from: str, base_lr: float, peak_lr: float) -> float:
    """The learning rate a warmup starts from; refuses a warmup that would not ramp."""
    if warmup_from not in WARMUP_STARTS:
        raise ValueError(f"unknown warmup start {warmup_from!r}; choose one of {WARMUP_STARTS}")
    if warmup_from == "zero":
        return 0.0
    if base_lr >= peak_lr:
        raise ValueError(
            f"a warmup from the base lr {base_lr:g} to the peak lr {peak_lr:g} would not ramp up "
            f"(the peak is the base lr scaled to the global batch, and here it is not larger: "
            f"lr_scaling 'none', or a batch at or below reference_batch); warm up from zero "
            f"(optim.warmup_from = 'zero') or set optim.warmup_epochs = 0")
    return base_lr


def scaled_learning_rate(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The peak learning rate for ``global_batch`` from ``base_lr`` tuned at ``reference_batch``."""
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}; choose one of {SCALING_RULES}")
    k = global_batch / reference_batch
    return base_lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]


@keras.saving.register_keras_serializable(package="hvd_gradalign")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from ``initial_lr`` to ``peak_lr`` over ``warmup_steps`` updates, then
    ``constant``, ``step`` (multiply by ``decay_factor`` at each of ``boundaries``, in
    updates) or ``cosine`` (to 0 at ``total_steps``) decay."""

    def __init__(self, peak_lr, initial_lr=None, warmup_steps=0, decay="constant",
                 total_steps=None, boundaries=(), decay_factor=0.1):
        if decay not in DECAYS:
            raise ValueError(f"unknown decay {decay!r}; choose one of {DECAYS}")
        if decay == "cosine" and not total_steps:
            raise ValueError("cosine decay needs total_steps")
        self.peak_lr = float(peak_lr)
        self.initial_lr = float(peak_lr if initial_lr is None else initial_lr)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.total_steps = None if total_steps is None else int(total_steps)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_factor = float(decay_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak_lr, tf.float32)
        if self.decay == "constant":
            after = peak
        elif self.decay == "step":
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) \
                if self.boundaries else tf.constant(0.0)
            after = peak * tf.pow(tf.constant(self.decay_factor, tf.float32), passed)
        else:
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            after = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        if self.warmup_steps <= 0:
            return after
        frac = tf.minimum(step / self.warmup_steps, 1.0)
        warm = self.initial_lr + (self.peak_lr - self.initial_lr) * frac
        return tf.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return dict(peak_lr=self.peak_lr, initial_lr=self.initial_lr, warmup_steps=self.warmup_steps,
                    decay=self.decay, total_steps=self.total_steps, boundaries=self.boundaries,
                    decay_factor=self.decay_factor)
