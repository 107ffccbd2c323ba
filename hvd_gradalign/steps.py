"""Train steps: the exact two-pass step and its pieces, usable without Keras' fit.

One update of the two-pass family (GradAlign, SAM, the gradient-norm penalty;
docs/algorithm.md says why and what is tested):

1. g_j = ∇f_j(x) for every micro-batch j of this worker;
2. ḡ = mean of all g_j of all workers (allreduce #1; it also carries V);
3. h_j = ∇f_j(x + v_j) on the same samples, with the method's displacement v_j
   (``hvd_gradalign.displacements``; GradAlign: v_j = β·(g_j − ḡ));
4. h = mean of all h_j (allreduce #2), which the inner optimizer applies to x.

Micro-batches are processed in a ``tf.while_loop`` so that the traced graph does
not grow with their number. A local batch of any size n >= 1 works: it is cut into
min(m, n) slices of near-equal size, and every mean weights a slice by its samples.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from . import displacements, distributed, loss_scaling


class GradAlignResult(NamedTuple):
    gradients: list          # h, averaged over all micro-batches of all workers
    loss: tf.Tensor          # this worker's loss at x (mean over its micro-batches)
    outputs: object          # loss_fn's outputs at x, concatenated over micro-batches
    grad_variance: tf.Tensor        # V = mean_j ‖g_j − ḡ‖² over all micro-batches
    grad_variance_ratio: tf.Tensor  # V / ‖ḡ‖²
    finite: tf.Tensor = True        # ḡ and h are finite (checked only under loss scaling)


def first_leaf(data):
    """The first tensor (or spec) of a nest, skipping None; None if there is none."""
    return next((t for t in tf.nest.flatten(data) if t is not None), None)


def micro_batch_sizes(batch_size: int, micro_batches: int) -> list[int]:
    """The sizes of the slices a local batch is cut into: min(m, n) consecutive slices
    whose sizes differ by at most one, the larger ones first."""
    k = min(micro_batches, batch_size)
    base, extra = divmod(batch_size, k)
    return [base + (j < extra) for j in range(k)]


class _Slices(NamedTuple):
    count: tf.Tensor   # k = min(m, n)
    base: tf.Tensor    # n // k
    extra: tf.Tensor   # n % k: slices 0..extra-1 hold one sample more
    total: tf.Tensor   # n

    def bounds(self, j):
        return j * self.base + tf.minimum(j, self.extra), self.base + tf.cast(j < self.extra, tf.int32)


def _slices(data, micro_batches: int) -> _Slices:
    n = tf.shape(first_leaf(data))[0]
    tf.debugging.assert_positive(n, message="GradAlign: a local batch of 0 samples has no gradient")
    k = tf.minimum(n, micro_batches)
    return _Slices(k, n // k, n % k, n)


def _slice(data, start, size):
    return tf.nest.map_structure(lambda t: None if t is None else t[start:start + size], data)


def _snapshot(variables):
    return [tf.identity(tf.convert_to_tensor(v)) for v in variables]


def _restore(variables, values):
    for v, value in zip(variables, values):
        v.assign(value)


def _metric_dtype(variables):
    return tf.float64 if any(v.dtype == "float64" for v in variables) else tf.float32


def gradalign_gradients(
    loss_fn: Callable,
    variables,
    data,
    micro_batches: int,
    beta,
    state_variables=(),
    skip_second_pass: bool = False,
) -> GradAlignResult:
    """The GradAlign gradient for one update, averaged over all workers:
    :func:`two_pass_gradients` with v_j = β·(g_j − ḡ)."""
    return two_pass_gradients(loss_fn, variables, data, micro_batches, beta, displacements.gradalign,
                              state_variables=state_variables, skip_second_pass=skip_second_pass)


def two_pass_gradients(
    loss_fn: Callable,
    variables,
    data,
    micro_batches: int,
    strength,
    displacement: Callable = displacements.gradalign,
    state_variables=(),
    skip_second_pass: bool = False,
    loss_scale=None,
) -> GradAlignResult:
    """The two-pass gradient for one update, averaged over all workers.

    Args:
        loss_fn: ``loss_fn(micro_batch) -> (loss, outputs)``, the mean loss of one
            micro-batch computed with the current values of ``variables``;
            ``outputs`` (any nest of tensors, e.g. predictions) is concatenated over
            micro-batches of the first pass and returned.
        variables: the trainable variables (Keras or tf variables).
        data: this worker's local batch: any nest of tensors with the batch first,
            of any size n >= 1 (it may differ between steps and workers).
        micro_batches: m. The batch is cut into k = min(m, n) consecutive slices
            whose sizes differ by at most one (``micro_batch_sizes``); means over
            slices and workers weight each slice by its number of samples, so the
            result is GradAlign on those slices and β = 0 is the gradient of the
            mean loss over all samples of all workers.
        strength: the displacement's strength, β or ρ (float or scalar tensor).
        displacement: ``rule(g_j, ḡ, x, strength) -> v_j`` (``hvd_gradalign.displacements``).
        state_variables: non-trainable state that the forward pass changes
            (BatchNorm moving statistics, dropout seeds). The second pass starts
            from the same state as the first, so each micro-batch sees the same
            dropout draw twice; the state after the step is the first pass's.
        skip_second_pass: the strength is identically zero: h = ḡ, one allreduce.
        loss_scale: a float32 scalar (mixed_float16's dynamic scale) or None: every
            micro-batch's loss is multiplied by it before differentiation and its
            gradients divided by it at once, so the displacements, the means and V are
            computed on true gradients; ``finite`` then tells whether ḡ and h are
            finite (the same on every worker: they are allreduced means).
    """
    variables = list(variables)
    state_variables = list(state_variables)
    slices = _slices(data, micro_batches)
    mdtype = _metric_dtype(variables)

    def gradients_on(j):
        start, size = slices.bounds(j)
        with tf.GradientTape() as tape:
            loss, outputs = loss_fn(_slice(data, start, size))
            scaled = loss if loss_scale is None else tf.cast(loss, tf.float32) * loss_scale
        grads = tape.gradient(scaled, variables)
        if loss_scale is not None:
            grads = [None if g is None else tf.convert_to_tensor(g) / tf.cast(loss_scale, g.dtype)
                     for g in grads]
        return loss, outputs, grads, size

    x = _snapshot(variables)
    s0 = _snapshot(state_variables)
    g_stack, sizes, loss, outputs = _first_pass(gradients_on, variables, slices, mdtype)
    g_bar, mean_n, variance, ratio = _mean_gradient_and_variance(g_stack, sizes, slices.total, mdtype)
    if skip_second_pass:
        return GradAlignResult(g_bar, loss, outputs, variance, ratio, _finite(loss_scale, g_bar))
    # Same samples, same random state (dropout draw) as the first pass; the state
    # kept after the step (BatchNorm moving statistics) is the first pass's.
    s1 = _snapshot(state_variables)
    _restore(state_variables, s0)
    h_sum = _second_pass(gradients_on, variables, x, g_stack, g_bar, strength, displacement,
                         slices.count)
    _restore(variables, x)
    _restore(state_variables, s1)
    h = [None if t is None else t / tf.cast(mean_n, t.dtype) for t in distributed.allreduce_mean(h_sum)]
    return GradAlignResult(h, loss, outputs, variance, ratio, _finite(loss_scale, g_bar + h))


def _finite(loss_scale, gradients):
    return tf.constant(True) if loss_scale is None else loss_scaling.all_finite(gradients)


def _first_pass(gradients_on, variables, slices, mdtype):
    """g_j at x for every micro-batch j: ([k, ...] stacked gradients or None per
    variable, the slices' sizes [k], the sample-weighted mean loss, the outputs
    concatenated over micro-batches)."""
    # Micro-batch 0 runs outside the loop: it tells which variables get no
    # gradient and the shapes of the outputs.
    k = slices.count
    loss0, outputs0, grads0, size0 = gradients_on(0)
    present = [i for i, g in enumerate(grads0) if g is not None]
    g_tas = [tf.TensorArray(variables[i].dtype, size=k, element_shape=variables[i].shape)
             .write(0, tf.convert_to_tensor(grads0[i])) for i in present]
    # Slices of unequal sizes: outputs are concatenated, not stacked.
    out_tas = [tf.TensorArray(leaf.dtype, size=k, infer_shape=False).write(0, leaf)
               for leaf in tf.nest.flatten(outputs0)]
    size_ta = tf.TensorArray(tf.int32, size=k).write(0, size0)

    def weighted(loss, size):
        return tf.cast(loss, mdtype) * tf.cast(size, mdtype)

    def body(j, loss_sum, g_tas, out_tas, size_ta):
        loss, outputs, grads, size = gradients_on(j)
        g_tas = [ta.write(j, tf.convert_to_tensor(grads[i])) for ta, i in zip(g_tas, present)]
        out_tas = [ta.write(j, leaf) for ta, leaf in zip(out_tas, tf.nest.flatten(outputs))]
        return j + 1, loss_sum + weighted(loss, size), g_tas, out_tas, size_ta.write(j, size)

    _, loss_sum, g_tas, out_tas, size_ta = tf.while_loop(
        lambda j, *_: j < k, body, (tf.constant(1), weighted(loss0, size0), g_tas, out_tas, size_ta),
        parallel_iterations=1,
    )
    g_stack = [None] * len(variables)
    for i, ta in zip(present, g_tas):
        g_stack[i] = ta.stack()
    def concat_micro_batches(ta, leaf0):
        out = ta.concat()
        out.set_shape(tf.TensorShape([None]).concatenate(leaf0.shape[1:]))
        return out

    outputs = tf.nest.pack_sequence_as(
        outputs0, [concat_micro_batches(ta, leaf) for ta, leaf in zip(out_tas, tf.nest.flatten(outputs0))])
    return g_stack, size_ta.stack(), loss_sum / tf.cast(slices.total, mdtype), outputs


def _weighted_sum(stack, sizes):
    """Σ_j n_j · stack[j]."""
    w = tf.reshape(tf.cast(sizes, stack.dtype), tf.concat([[-1], tf.ones([tf.rank(stack) - 1], tf.int32)], 0))
    return tf.reduce_sum(w * stack, axis=0)


def _mean_gradient_and_variance(g_stack, sizes, n, mdtype):
    """Allreduce #1: ḡ over all micro-batches of all workers, each weighted by its
    samples, with V and V/‖ḡ‖² and the mean local batch size over workers.

    Each worker sends Σ_j n_j g_j, Σ_j n_j ‖g_j‖² and n: their means over workers,
    divided by the mean n, are ḡ and the sample-weighted mean of ‖g_j‖², so that
    V = Σ_j (n_j/N) ‖g_j − ḡ‖² = that mean − ‖ḡ‖² rides on this allreduce."""
    g_sum = [None if g is None else _weighted_sum(g, sizes) for g in g_stack]
    sq_each = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, mdtype)), axis=tf.range(1, tf.rank(g)))
                        for g in g_stack if g is not None])
    sq_sum = tf.reduce_sum(tf.cast(sizes, mdtype) * sq_each)
    reduced = distributed.allreduce_mean(g_sum + [sq_sum, tf.cast(n, mdtype)])
    mean_n = reduced[-1]
    g_bar = [None if g is None else g / tf.cast(mean_n, g.dtype) for g in reduced[:-2]]
    g_bar_sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, mdtype))) for g in g_bar
                         if g is not None])
    variance = tf.maximum(reduced[-2] / mean_n - g_bar_sq, 0.0)
    return g_bar, mean_n, variance, tf.math.divide_no_nan(variance, g_bar_sq)


def _second_pass(gradients_on, variables, x, g_stack, g_bar, strength, displacement, k):
    """This worker's Σ_j n_j h_j with h_j = ∇f_j(x + v_j); the variables are left
    displaced (the caller restores x)."""
    strength = tf.cast(strength, tf.float64)

    def body(j, h_sum):
        g_j = [None if g is None else g[j] for g in g_stack]
        for v, x_v, d in zip(variables, x, displacement(g_j, g_bar, x, strength)):
            if d is not None:
                v.assign(x_v + d)
        _, _, grads, size = gradients_on(j)
        return j + 1, [h if g is None else h + tf.cast(size, h.dtype) * tf.convert_to_tensor(g)
                       for h, g in zip(h_sum, grads)]

    h_init = [tf.zeros(v.shape, v.dtype) for v in variables]
    _, h_sum = tf.while_loop(
        lambda j, *_: j < k, body, (tf.constant(0), h_init), parallel_iterations=1
    )
    return [h if g is not None else None for h, g in zip(h_sum, g_stack)]


def two_pass_step(loss_fn: Callable, variables, optimizer, data, state_variables=()) -> GradAlignResult:
    """One update of a two-pass optimizer (GradAlign, SAM, GradientPenalty) for a custom
    training loop.

    ``optimizer`` is the two-pass optimizer, or a ``keras.optimizers.LossScaleOptimizer``
    around one (what ``compile`` makes under the ``mixed_float16`` policy): then both
    passes are loss-scaled and an update whose ḡ or h is not finite is skipped on every
    worker and the scale halved (``hvd_gradalign.loss_scaling``). ``loss_fn`` and the
    other arguments are those of :func:`two_pass_gradients`. Wrap the call in
    ``tf.function`` (without ``jit_compile``) for speed.
    """
    variables = list(variables)
    scaler, method = loss_scaling.unwrap(optimizer)
    if scaler is not None:
        loss_scaling.ensure_built(scaler, variables)
    method._ensure_built(variables)
    result = two_pass_gradients(
        loss_fn, variables, data,
        micro_batches=method.micro_batches,
        strength=method.current_strength(),
        displacement=method.displacement,
        state_variables=state_variables,
        skip_second_pass=method.is_plain_data_parallel,
        loss_scale=None if scaler is None else scaler.dynamic_scale,
    )
    if scaler is None:
        method.apply_averaged(result.gradients, variables)
        return result
    applied = loss_scaling.apply_if_finite(
        scaler, result.finite, lambda: method.apply_averaged(result.gradients, variables))
    return result._replace(finite=applied)


# The name custom loops have used since GradAlign was the only two-pass method.
gradalign_step = two_pass_step
