"""Where each micro-batch takes its second gradient: one rule per two-pass method.

GradAlign, SAM and the gradient-norm penalty are one step (``steps.two_pass_gradients``):
micro-batch j takes h_j = ∇f_j(x + v_j) on its own samples and the inner optimizer applies
the sample-weighted mean of the h_j from x. Only v_j differs (docs/algorithm.md):

==================  =====================  ==========================================
rule                v_j                     regulariser followed (first order)
==================  =====================  ==========================================
``gradalign``       β (g_j − ḡ)             (β/2)·mean_j ‖g_j − ḡ‖²  (the variance V/2)
``grad_penalty``    β g_j                   (β/2)·mean_j ‖g_j‖²
``sam``             ρ g_j / ‖g_j‖           mean_j max_{‖ε‖≤ρ} f_j(x + ε)
``sam_global``      ρ ḡ / ‖ḡ‖               max_{‖ε‖≤ρ} f(x + ε)
==================  =====================  ==========================================

Adaptive SAM (ASAM, Kwon et al. 2021) replaces u/‖u‖ by T² u / ‖T u‖ with T = |x| + η, so
that the neighbourhood scales with each weight. A zero direction gives v = 0, never a
division by zero. A rule is ``rule(g_j, g_bar, x, strength) -> v_j``: lists over the
variables (None where a variable gets no gradient), ``strength`` a float64 scalar.
"""

from __future__ import annotations

import tensorflow as tf

ASAM_ETA = 0.01  # Kwon et al.'s η, the floor of the scale |x| + η


def _present(values):
    return [t for t in values if t is not None]


def _norm(values):
    """The global L2 norm of a list of tensors, in float64 whatever their dtypes."""
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, tf.float64))) for t in _present(values)]))


def _scaled(values, factor):
    return [None if t is None else tf.cast(factor, t.dtype) * t for t in values]


def gradalign(g_j, g_bar, x, strength):
    return [None if g is None else tf.cast(strength, g.dtype) * (g - gb) for g, gb in zip(g_j, g_bar)]


def grad_penalty(g_j, g_bar, x, strength):
    return _scaled(g_j, strength)


def _sharpness_ascent(direction, x, radius, adaptive):
    """ρ u/‖u‖, or ASAM's ρ T² u/‖T u‖ with T = |x| + η; zero where u is zero."""
    if adaptive:
        scale = [None if u is None else tf.abs(w) + ASAM_ETA for u, w in zip(direction, x)]
        scaled = [None if u is None else s * u for u, s in zip(direction, scale)]
        factor = tf.math.divide_no_nan(radius, _norm(scaled))
        return [None if u is None else tf.cast(factor, u.dtype) * s * su
                for u, s, su in zip(direction, scale, scaled)]
    return _scaled(direction, tf.math.divide_no_nan(radius, _norm(direction)))


def sam(adaptive=False):
    """SAM per micro-batch (m-sharpness): each micro-batch ascends along its own g_j. It
    needs no mean gradient; the step's first allreduce serves only the V log."""
    def rule(g_j, g_bar, x, strength):
        return _sharpness_ascent(g_j, x, strength, adaptive)
    return rule


def sam_global(adaptive=False):
    """SAM on the whole batch: every micro-batch ascends along the mean gradient ḡ."""
    def rule(g_j, g_bar, x, strength):
        return _sharpness_ascent(g_bar, x, strength, adaptive)
    return rule
