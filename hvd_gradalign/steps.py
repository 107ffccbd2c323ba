"""Train steps: the exact GradAlign step and its pieces, usable without Keras' fit.

The GradAlign step for one update (docs/algorithm.md says why and what is tested):

1. g_j = ∇f_j(x) for every micro-batch j of this worker;
2. ḡ = mean of all g_j of all workers (allreduce #1);
3. h_j = ∇f_j(x + β·(g_j − ḡ)) on the same samples;
4. h = mean of all h_j (allreduce #2), which the inner optimizer applies to x.

Micro-batches are processed in a ``tf.while_loop`` so that the traced graph does
not grow with their number.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from . import distributed


class GradAlignResult(NamedTuple):
    gradients: list          # h, averaged over all micro-batches of all workers
    loss: tf.Tensor          # this worker's loss at x (mean over its micro-batches)
    outputs: object          # loss_fn's outputs at x, concatenated over micro-batches
    grad_variance: tf.Tensor        # V = mean_j ‖g_j − ḡ‖² over all micro-batches
    grad_variance_ratio: tf.Tensor  # V / ‖ḡ‖²


def micro_batch_error(batch_size: int, micro_batches: int) -> str | None:
    """Why a local batch of ``batch_size`` cannot be cut into ``micro_batches`` slices."""
    if batch_size < micro_batches:
        return (
            f"a local batch of {batch_size} samples is smaller than micro_batches="
            f"{micro_batches}; raise the per-worker batch size or lower micro_batches"
        )
    if batch_size % micro_batches:
        return (
            f"a local batch of {batch_size} samples does not split into micro_batches="
            f"{micro_batches} equal slices; use a per-worker batch that is a multiple of "
            f"micro_batches and batch the data with drop_remainder=True so that the last, "
            f"partial batch of an epoch is dropped"
        )
    return None


def first_leaf(data):
    """The first tensor (or spec) of a nest, skipping None; None if there is none."""
    return next((t for t in tf.nest.flatten(data) if t is not None), None)


def _micro_batch_size(data, micro_batches: int):
    first = first_leaf(data)
    static = first.shape[0]
    if static is not None:
        error = micro_batch_error(int(static), micro_batches)
        if error:
            raise ValueError(f"GradAlign: {error}.")
        return int(static) // micro_batches
    n = tf.shape(first)[0]
    tf.debugging.assert_equal(
        n % micro_batches, 0,
        message=f"GradAlign: a local batch does not split into micro_batches={micro_batches} "
        "equal slices; batch the data with drop_remainder=True and a per-worker batch "
        "that is a multiple of micro_batches",
    )
    tf.debugging.assert_greater_equal(
        n, micro_batches, message=f"GradAlign: local batch smaller than micro_batches={micro_batches}"
    )
    return n // micro_batches


def _slice(data, j, b):
    return tf.nest.map_structure(lambda t: None if t is None else t[j * b:(j + 1) * b], data)


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
    """The GradAlign gradient for one update, averaged over all workers.

    Args:
        loss_fn: ``loss_fn(micro_batch) -> (loss, outputs)``, the mean loss of one
            micro-batch computed with the current values of ``variables``;
            ``outputs`` (any nest of tensors, e.g. predictions) is concatenated over
            micro-batches of the first pass and returned.
        variables: the trainable variables (Keras or tf variables).
        data: this worker's local batch: any nest of tensors with the batch first.
        micro_batches: m, the number of equal consecutive slices of ``data``.
        beta: β (float or scalar tensor).
        state_variables: non-trainable state that the forward pass changes
            (BatchNorm moving statistics, dropout seeds). The second pass starts
            from the same state as the first, so each micro-batch sees the same
            dropout draw twice; the state after the step is the first pass's.
        skip_second_pass: β is identically zero: h = ḡ, one allreduce.
    """
    variables = list(variables)
    state_variables = list(state_variables)
    m = micro_batches
    b = _micro_batch_size(data, m)
    mdtype = _metric_dtype(variables)

    def gradients_on(j):
        with tf.GradientTape() as tape:
            loss, outputs = loss_fn(_slice(data, j, b))
        return loss, outputs, tape.gradient(loss, variables)

    x = _snapshot(variables)
    s0 = _snapshot(state_variables)
    g_stack, loss, outputs = _first_pass(gradients_on, variables, m, mdtype)
    g_bar, variance, ratio = _mean_gradient_and_variance(g_stack, m, mdtype)
    if skip_second_pass:
        return GradAlignResult(g_bar, loss, outputs, variance, ratio)
    # Same samples, same random state (dropout draw) as the first pass; the state
    # kept after the step (BatchNorm moving statistics) is the first pass's.
    s1 = _snapshot(state_variables)
    _restore(state_variables, s0)
    h_local = _second_pass(gradients_on, variables, x, g_stack, g_bar, beta, m)
    _restore(variables, x)
    _restore(state_variables, s1)
    return GradAlignResult(distributed.allreduce_mean(h_local), loss, outputs, variance, ratio)


def _first_pass(gradients_on, variables, m, mdtype):
    """g_j at x for every micro-batch j: ([m, ...] stacked gradients or None per
    variable, the mean loss, the outputs concatenated over micro-batches)."""
    # Micro-batch 0 runs outside the loop: it tells which variables get no
    # gradient and the shapes of the outputs.
    loss0, outputs0, grads0 = gradients_on(0)
    present = [i for i, g in enumerate(grads0) if g is not None]
    g_tas = [tf.TensorArray(variables[i].dtype, size=m, element_shape=variables[i].shape)
             .write(0, tf.convert_to_tensor(grads0[i])) for i in present]
    out_tas = [tf.TensorArray(leaf.dtype, size=m, element_shape=leaf.shape).write(0, leaf)
               for leaf in tf.nest.flatten(outputs0)]

    def body(j, loss_sum, g_tas, out_tas):
        loss, outputs, grads = gradients_on(j)
        g_tas = [ta.write(j, tf.convert_to_tensor(grads[i])) for ta, i in zip(g_tas, present)]
        out_tas = [ta.write(j, leaf) for ta, leaf in zip(out_tas, tf.nest.flatten(outputs))]
        return j + 1, loss_sum + tf.cast(loss, mdtype), g_tas, out_tas

    _, loss_sum, g_tas, out_tas = tf.while_loop(
        lambda j, *_: j < m, body, (tf.constant(1), tf.cast(loss0, mdtype), g_tas, out_tas),
        parallel_iterations=1,
    )
    g_stack = [None] * len(variables)
    for i, ta in zip(present, g_tas):
        g_stack[i] = ta.stack()

    def concat_micro_batches(ta):
        stacked = ta.stack()  # [m, b, ...] -> [m*b, ...]
        return tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], 0))

    outputs = tf.nest.pack_sequence_as(outputs0, [concat_micro_batches(ta) for ta in out_tas])
    return g_stack, loss_sum / m, outputs


def _mean_gradient_and_variance(g_stack, m, mdtype):
    """Allreduce #1: ḡ over all micro-batches of all workers, with V and V/‖ḡ‖².

    V = mean_j ‖g_j‖² − ‖ḡ‖² (the same value as mean_j ‖g_j − ḡ‖²) so that the
    metric rides on this allreduce and costs no extra communication."""
    g_local = [None if g is None else tf.reduce_mean(g, axis=0) for g in g_stack]
    sq_local = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, mdtype))) for g in g_stack
                         if g is not None]) / m
    reduced = distributed.allreduce_mean(g_local + [sq_local])
    g_bar, mean_sq = reduced[:-1], reduced[-1]
    g_bar_sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, mdtype))) for g in g_bar
                         if g is not None])
    variance = tf.maximum(mean_sq - g_bar_sq, 0.0)
    return g_bar, variance, tf.math.divide_no_nan(variance, g_bar_sq)


def _second_pass(gradients_on, variables, x, g_stack, g_bar, beta, m):
    """This worker's mean of h_j = ∇f_j(x + β(g_j − ḡ)); the variables are left
    displaced (the caller restores x)."""
    def body(j, h_sum):
        for v, x_v, g, gb in zip(variables, x, g_stack, g_bar):
            if g is not None:
                v.assign(x_v + tf.cast(beta, v.dtype) * (g[j] - gb))
        _, _, grads = gradients_on(j)
        return j + 1, [h if g is None else h + tf.convert_to_tensor(g)
                       for h, g in zip(h_sum, grads)]

    h_init = [tf.zeros(v.shape, v.dtype) for v in variables]
    _, h_sum = tf.while_loop(
        lambda j, *_: j < m, body, (tf.constant(0), h_init), parallel_iterations=1
    )
    return [h / m if g is not None else None for h, g in zip(h_sum, g_stack)]


def gradalign_step(loss_fn: Callable, variables, optimizer, data, state_variables=()) -> GradAlignResult:
    """One GradAlign update for a custom training loop.

    ``optimizer`` is a :class:`hvd_gradalign.GradAlign`; ``loss_fn`` and the other
    arguments are those of :func:`gradalign_gradients`. Wrap the call in
    ``tf.function`` (without ``jit_compile``) for speed.
    """
    variables = list(variables)
    result = gradalign_gradients(
        loss_fn, variables, data,
        micro_batches=optimizer.micro_batches,
        beta=optimizer.current_beta(),
        state_variables=state_variables,
        skip_second_pass=optimizer.is_plain_data_parallel,
    )
    optimizer.apply_averaged(result.gradients, variables)
    return result
