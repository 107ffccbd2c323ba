"""Dynamic loss scaling (the ``mixed_float16`` policy) on several workers.

Under ``keras.mixed_precision.set_global_policy("mixed_float16")`` Keras wraps the
compiled optimizer as ``keras.optimizers.LossScaleOptimizer(opt)``; users may also
write that themselves. Its rule (scale the loss, unscale the gradients, skip the
update and halve the scale when a gradient is not finite, double it after
``dynamic_growth_steps`` finite steps) needs two changes to hold on several workers:

- The finiteness decision must be the same on every worker. Keras takes it on the
  local gradients, before ``DistributedOptimizer.apply`` allreduces them: a worker
  whose own gradient overflowed would skip the allreduce the others wait in, for
  ever. ``install`` makes the decision collective (one scalar allreduce).
- The two-pass family (GradAlign, SAM, GradientPenalty) takes two gradients per
  micro-batch and owns both allreduces, so the scale must cover both passes and the
  decision must see both: ``two_pass_step`` scales each micro-batch's loss, unscales
  its gradients before they are displaced or averaged, and decides on ḡ and h after
  their allreduces (identical on every worker, as a mean carries any inf or NaN).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from . import distributed

LossScaleOptimizer = keras.optimizers.LossScaleOptimizer


def unwrap(optimizer):
    """(the LossScaleOptimizer or None, the optimizer it wraps or ``optimizer`` itself)."""
    if isinstance(optimizer, LossScaleOptimizer):
        return optimizer, optimizer.inner_optimizer
    return None, optimizer


def all_finite(tensors) -> tf.Tensor:
    present = [t for t in tensors if t is not None]
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in present]))


def ensure_built(scaler, variables) -> None:
    # Its variables must exist before the update's tf.cond (none may be made in a branch).
    if not scaler.built:
        scaler.build(list(variables))
        scaler.built = True


def apply_if_finite(scaler, finite, apply) -> tf.Tensor:
    """Keras' dynamic loss-scale rule around ``apply()`` (which applies gradients already
    unscaled and averaged): ``finite`` must be the same on every worker. Returns it."""

    def on_finite():
        apply()

        def grow():
            scaler.step_counter.assign(0)
            scaler.dynamic_scale.assign(scaler.dynamic_scale * 2.0)

        def count():
            scaler.step_counter.assign_add(1)

        tf.cond(tf.equal(scaler.step_counter, scaler.dynamic_growth_steps - 1), grow, count)
        return tf.constant(True)

    def on_overflow():
        scaler.step_counter.assign(0)
        scaler.dynamic_scale.assign(scaler.dynamic_scale * 0.5)
        return tf.constant(False)

    return tf.cond(finite, on_finite, on_overflow)


_STOCK_CHECK_FINITE = None


def install() -> None:
    """Make LossScaleOptimizer's finiteness decision collective when it wraps a
    DistributedOptimizer on several workers (idempotent)."""
    global _STOCK_CHECK_FINITE
    if _STOCK_CHECK_FINITE is not None:
        return
    from .optimizers import DistributedOptimizer

    stock = _STOCK_CHECK_FINITE = LossScaleOptimizer.check_finite

    def check_finite(self, grads):
        finite = stock(self, grads)
        if isinstance(self.inner_optimizer, DistributedOptimizer) and distributed.size() > 1:
            # The mean of 0/1 flags is 1 only where every worker's gradients are finite.
            finite = distributed.allreduce_mean([tf.cast(finite, tf.float32)])[0] >= 1.0
        return finite

    check_finite.__doc__ = stock.__doc__
    LossScaleOptimizer.check_finite = check_finite
