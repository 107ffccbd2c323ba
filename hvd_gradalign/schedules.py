"""Learning-rate scaling and schedules (Goyal et al. 2017: linear scaling + warmup)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

# The lr arithmetic and the names of the schedules are TensorFlow-free, for validating a run
# before launch; re-exported as part of this module's API.
from hvd_gradalign_base.settings import (  # noqa: F401
    DECAYS,
    SCALING_RULES,
    WARMUP_STARTS,
    scaled_learning_rate,
    warmup_start,
)


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
