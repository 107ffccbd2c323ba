"""The sign and finite-difference oracles of docs/algorithm.md, run through the library's step."""

import numpy as np
import pytest
import tensorflow as tf

import hvd_gradalign as hga
from tests import oracle as ref


def _least_squares_problem():
    rng = np.random.default_rng(3)
    d, n = 4, 16
    # Two micro-batches with different curvature, so V depends on x.
    x1 = rng.normal(size=(n, d)) * np.array([3.0, 1.0, 0.3, 1.0])
    x2 = rng.normal(size=(n, d)) * np.array([0.3, 1.0, 3.0, 0.5])
    y1, y2 = rng.normal(size=n), rng.normal(size=n) + 1.0
    w0 = rng.normal(size=(d, 1))
    return np.concatenate([x1, x2]), np.concatenate([y1, y2]), w0, [(x1, y1), (x2, y2)]


def _library_direction(x, y, w0, beta, micro_batches=2):
    """(h, V) from hvd_gradalign.gradalign_gradients for f_j = mean((x w − y)²)."""
    w = tf.Variable(w0)
    xt, yt = tf.constant(x), tf.constant(y)

    def loss_fn(mb):
        xb, yb = mb
        pred = tf.matmul(xb, w)[:, 0]
        return tf.reduce_mean(tf.square(pred - yb)), pred

    result = hga.gradalign_gradients(loss_fn, [w], (xt, yt), micro_batches, tf.constant(beta, tf.float64))
    np.testing.assert_array_equal(w.numpy(), w0)  # displaced weights are thrown away
    return result.gradients[0].numpy(), float(result.grad_variance)


def test_library_direction_matches_oracle(hvd):
    x, y, w0, mbs = _least_squares_problem()
    h, v = _library_direction(x, y, w0, beta=0.05)
    h_ref, v_ref, _ = ref.gradalign_direction(ref.least_squares_grad, [w0], mbs, 0.05)
    np.testing.assert_allclose(h, h_ref[0], rtol=1e-10, atol=1e-12)
    assert v == pytest.approx(v_ref, rel=1e-10)


def test_sign_positive_beta_lowers_variance_negative_raises(hvd):
    x, y, w0, mbs = _least_squares_problem()
    lr, beta = 0.01, 0.05
    after = {}
    for b in (beta, 0.0, -beta):
        h, _ = _library_direction(x, y, w0, b)
        after[b] = ref.variance(ref.least_squares_grad, [w0 - lr * h], mbs)
    assert after[beta] < after[0.0] < after[-beta]


def _softmax_problem():
    rng = np.random.default_rng(5)
    n, d, k = 12, 3, 3
    x = rng.normal(size=(3 * n, d)) * np.repeat([[2.0], [0.5], [1.0]], n, axis=0)
    y = rng.integers(0, k, size=3 * n)
    params = [rng.normal(scale=0.5, size=(d, k)), rng.normal(scale=0.1, size=k)]
    mbs = [(x[j * n:(j + 1) * n], y[j * n:(j + 1) * n]) for j in range(3)]
    return x, y, params, mbs


def _library_softmax_direction(x, y, params, beta):
    w, c = tf.Variable(params[0]), tf.Variable(params[1])

    def loss_fn(mb):
        xb, yb = mb
        logits = tf.matmul(xb, w) + c
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)
        return tf.reduce_mean(loss), logits

    result = hga.gradalign_gradients(loss_fn, [w, c], (tf.constant(x), tf.constant(y)), 3,
                                     tf.constant(beta, tf.float64))
    return [g.numpy() for g in result.gradients]


def test_direction_approaches_beta_grad_half_variance(hvd):
    """(1/M) Σ h_j − ḡ → β ∇(V/2) as β → 0, with a remainder of order β²;
    ∇V by central finite differences. Softmax regression: curvature varies with x."""
    x, y, params, mbs = _softmax_problem()
    g_bar = _library_softmax_direction(x, y, params, 0.0)
    eps = 1e-6
    grad_v = []
    for p_index, p in enumerate(params):
        gv = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[p_index][idx] += eps
            minus[p_index][idx] -= eps
            gv[idx] = (ref.variance(ref.softmax_regression_grad, plus, mbs)
                       - ref.variance(ref.softmax_regression_grad, minus, mbs)) / (2 * eps)
        grad_v.append(gv)
    target = np.concatenate([g.ravel() for g in grad_v]) / 2
    errors = []
    for beta in (1e-1, 1e-2, 1e-3):
        h = _library_softmax_direction(x, y, params, beta)
        diff = np.concatenate([(a - b).ravel() for a, b in zip(h, g_bar)])
        errors.append(np.linalg.norm(diff - beta * target) / np.linalg.norm(beta * target))
    assert errors[-1] < 1e-3
    # relative remainder O(β): shrinks about tenfold per decade of β
    assert errors[0] > 5 * errors[1] > 25 * errors[2]


def _mb_gradients(params, mbs):
    return [ref.softmax_regression_grad(params, xj, yj)[1] for xj, yj in mbs]


def _flat(values):
    return np.concatenate([v.ravel() for v in values])


# The regulariser each displacement follows to first order (docs/algorithm.md's table),
# per unit strength: mean h_j − ḡ → strength · ∇R.
REGULARISERS = {
    "grad_penalty": lambda p, mbs: 0.5 * np.mean([np.sum(_flat(g) ** 2) for g in _mb_gradients(p, mbs)]),
    "sam": lambda p, mbs: np.mean([np.linalg.norm(_flat(g)) for g in _mb_gradients(p, mbs)]),
    "sam_global": lambda p, mbs: np.linalg.norm(np.mean([_flat(g) for g in _mb_gradients(p, mbs)], axis=0)),
}


@pytest.mark.parametrize("method", sorted(REGULARISERS))
def test_two_pass_direction_approaches_its_regulariser(hvd, method):
    """SAM (per micro-batch and global) and the penalty: (1/M) Σ h_j − ḡ → s ∇R as the
    strength s → 0, R from the table (mean ‖g_j‖, ‖ḡ‖, mean ‖g_j‖²/2); ∇R by central
    finite differences; the remainder shrinks with s."""
    from hvd_gradalign import displacements

    rule = {"grad_penalty": displacements.grad_penalty, "sam": displacements.sam(),
            "sam_global": displacements.sam_global()}[method]
    x, y, params, mbs = _softmax_problem()

    def direction(strength):
        w, c = tf.Variable(params[0]), tf.Variable(params[1])

        def loss_fn(mb):
            xb, yb = mb
            logits = tf.matmul(xb, w) + c
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)), logits

        result = hga.two_pass_gradients(loss_fn, [w, c], (tf.constant(x), tf.constant(y)), 3,
                                        tf.constant(strength, tf.float64), rule)
        np.testing.assert_array_equal(w.numpy(), params[0])  # displaced weights are thrown away
        return _flat([g.numpy() for g in result.gradients])

    reg, eps = REGULARISERS[method], 1e-6
    target = []
    for p_index, p in enumerate(params):
        for idx in np.ndindex(p.shape):
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[p_index][idx] += eps
            minus[p_index][idx] -= eps
            target.append((reg(plus, mbs) - reg(minus, mbs)) / (2 * eps))
    target = np.array(target)
    g_bar = direction(0.0)
    errors = [np.linalg.norm(direction(s) - g_bar - s * target) / np.linalg.norm(s * target)
              for s in (1e-1, 1e-2, 1e-3)]
    assert errors[-1] < 1e-3
    assert errors[0] > 5 * errors[1] > 25 * errors[2]


def test_sam_zero_gradient_is_no_displacement(hvd):
    """A micro-batch whose gradient is zero gets v = 0 (never a division by zero)."""
    from hvd_gradalign import displacements

    zero = [tf.zeros((2, 2), tf.float64), None]
    for rule in (displacements.sam(), displacements.sam(adaptive=True), displacements.sam_global()):
        v = rule(zero, zero, [tf.ones((2, 2), tf.float64), None], tf.constant(0.5, tf.float64))
        assert v[1] is None
        np.testing.assert_array_equal(v[0].numpy(), np.zeros((2, 2)))
