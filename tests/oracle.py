"""Float64 NumPy re-implementation of GradAlign (docs/algorithm.md, steps 1-5).

Independent of TensorFlow: gradients are written out by hand.
"""

from __future__ import annotations

import numpy as np


def _softmax_xent_grad_logits(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    p[np.arange(len(y)), y] -= 1.0
    return loss, p / len(y)


def softmax_regression_grad(params, x, y):
    """Mean cross-entropy of logits = x W + c; params = [W, c]."""
    w, c = params
    loss, dlogits = _softmax_xent_grad_logits(x @ w + c, y)
    return loss, [x.T @ dlogits, dlogits.sum(axis=0)]


def mlp_grad(params, x, y):
    """Mean cross-entropy of a tanh MLP; params = [W1, b1, W2, b2]."""
    w1, b1, w2, b2 = params
    a = np.tanh(x @ w1 + b1)
    loss, dlogits = _softmax_xent_grad_logits(a @ w2 + b2, y)
    da = dlogits @ w2.T * (1.0 - a**2)
    return loss, [x.T @ da, da.sum(axis=0), a.T @ dlogits, dlogits.sum(axis=0)]


def least_squares_grad(params, x, y):
    """f = mean((x w - y)^2), Keras' MSE for a bias-free Dense(1); params = [w]."""
    (w,) = params
    r = x @ w - y[:, None]
    return float(np.mean(r**2)), [2.0 * x.T @ r / len(y)]


def _norm(values):
    return float(np.sqrt(sum(np.sum(v ** 2) for v in values)))


def _ascent(u, x, rho, adaptive):
    """ρ u/‖u‖, or ASAM's ρ T² u/‖T u‖ with T = |x| + 0.01; zero for a zero u."""
    t = [np.abs(w) + 0.01 if adaptive else np.ones_like(w) for w in x]
    n = _norm([ti * ui for ti, ui in zip(t, u)])
    return [np.zeros_like(ui) if n == 0 else rho * ti ** 2 * ui / n for ti, ui in zip(t, u)]


# v_j per method (docs/algorithm.md, "The two-pass family"): (g_j, ḡ, x, strength) -> v_j.
DISPLACEMENTS = {
    "gradalign": lambda gj, gb, x, s: [s * (a - b) for a, b in zip(gj, gb)],
    "grad_penalty": lambda gj, gb, x, s: [s * a for a in gj],
    "sam": lambda gj, gb, x, s: _ascent(gj, x, s, False),
    "sam_global": lambda gj, gb, x, s: _ascent(gb, x, s, False),
    "asam": lambda gj, gb, x, s: _ascent(gj, x, s, True),
    "asam_global": lambda gj, gb, x, s: _ascent(gb, x, s, True),
}


def two_pass_direction(grad_fn, params, micro_batches, strength, method="gradalign"):
    """h = Σ_j w_j ∇f_j(x + v_j) and V = Σ_j w_j ‖g_j − ḡ‖², with ḡ = Σ_j w_j g_j and
    w_j = n_j / N, micro-batch j's share of the samples (1/M when all are equal)."""
    w = np.array([len(yj) for _, yj in micro_batches], dtype=np.float64)
    w /= w.sum()

    def mean(values):
        return np.tensordot(w, np.array(values), axes=1)

    g = [grad_fn(params, xj, yj)[1] for xj, yj in micro_batches]
    g_bar = [mean([gj[i] for gj in g]) for i in range(len(params))]
    variance = mean([sum(np.sum((gj[i] - g_bar[i]) ** 2) for i in range(len(params))) for gj in g])
    h = []
    for (xj, yj), gj in zip(micro_batches, g):
        v = DISPLACEMENTS[method](gj, g_bar, params, strength)
        h.append(grad_fn([p + vi for p, vi in zip(params, v)], xj, yj)[1])
    h_bar = [mean([hj[i] for hj in h]) for i in range(len(params))]
    sq = sum(np.sum(gb**2) for gb in g_bar)
    return h_bar, variance, variance / sq


def gradalign_direction(grad_fn, params, micro_batches, beta):
    """GradAlign's h: v_j = β(g_j − ḡ)."""
    return two_pass_direction(grad_fn, params, micro_batches, beta, "gradalign")


def variance(grad_fn, params, micro_batches):
    g = [grad_fn(params, xj, yj)[1] for xj, yj in micro_batches]
    g_bar = [np.mean([gj[i] for gj in g], axis=0) for i in range(len(params))]
    return float(np.mean([sum(np.sum((gj[i] - g_bar[i]) ** 2) for i in range(len(params))) for gj in g]))


class SGD:
    """Keras' SGD: m = μ m − η g; x += m (μ = 0: x −= η g)."""

    def __init__(self, lr, momentum=0.0):
        self.lr, self.momentum, self.m = lr, momentum, None

    def step(self, params, grads, lr=None):
        lr = self.lr if lr is None else lr
        if self.momentum == 0.0:
            return [p - lr * g for p, g in zip(params, grads)]
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
        self.m = [self.momentum * m - lr * g for m, g in zip(self.m, grads)]
        return [p + m for p, m in zip(params, self.m)]


def train(grad_fn, params, x, y, global_batch, micro_batches_total, betas, optimizer, lrs=None,
          method="gradalign"):
    """Run len(betas) two-pass updates (``method``'s displacement, strength betas[t]) over
    consecutive global batches of (x, y).

    Returns the final params and the per-update V."""
    params = [p.copy() for p in params]
    b = global_batch // micro_batches_total
    variances = []
    for t, beta in enumerate(betas):
        xs, ys = x[t * global_batch:(t + 1) * global_batch], y[t * global_batch:(t + 1) * global_batch]
        mbs = [(xs[j * b:(j + 1) * b], ys[j * b:(j + 1) * b]) for j in range(micro_batches_total)]
        h, v, _ = two_pass_direction(grad_fn, params, mbs, beta, method)
        variances.append(v)
        params = optimizer.step(params, h, None if lrs is None else lrs[t])
    return params, variances


def federated_rounds(grad_fn, params, x, y, clients, sampled_per_round, cfg, rounds):
    """Float64 NumPy re-implementation of FedAvg / FedGA / one-sync FedGA / SCAFFOLD /
    FedProx rounds (hvd_gradalign/federated.py's docstring; the papers' update rules), with
    the clients' mini-batch order given by ``batches(client, round)``. ``cfg["g_estimate"]``
    may give one-sync FedGA's ĝ at the start (a resumed run's)."""
    params = [p.copy() for p in params]
    c = [np.zeros_like(p) for p in params]
    c_i = {}
    velocity = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    g_hat = cfg.get("g_estimate")
    for r in range(rounds):
        sampled = sampled_per_round[r]
        n = {k: float(len(clients[k])) for k in sampled}
        starts = {k: params for k in sampled}
        if cfg["algorithm"] in ("fedga", "fedga_1sync"):
            at = {k: clients[k][:cfg["grad_samples"]] if cfg.get("grad_samples") else clients[k] for k in sampled}
            g = {k: grad_fn(params, x[at[k]], y[at[k]])[1] for k in sampled}
            g_bar = [sum(n[k] * g[k][i] for k in sampled) / sum(n.values()) for i in range(len(params))]
            # two-sync FedGA displaces by g_i − ḡ; one-sync by g_i − ĝ (last round's ḡ), none in its first round
            ref = g_bar if cfg["algorithm"] == "fedga" else g_hat
            if ref is not None:
                starts = {k: [p + cfg["beta"] * (gk - gb) for p, gk, gb in zip(params, g[k], ref)]
                          for k in sampled}
        models, dcs = {}, {}
        for k in sampled:
            yk = [w.copy() for w in starts[k]]
            ck = c_i.get(k, [np.zeros_like(p) for p in params])
            for batch in cfg["batches"](k, r):
                grads = grad_fn(yk, x[batch], y[batch])[1]
                for i in range(len(yk)):
                    step = grads[i] + cfg.get("weight_decay", 0.0) * yk[i]
                    if cfg["algorithm"] == "fedprox":
                        step = step + cfg["mu"] * (yk[i] - params[i])
                    if cfg["algorithm"] == "scaffold":
                        step = step - ck[i] + c[i]
                    yk[i] = yk[i] - cfg["local_lr"] * step
            models[k] = yk
            if cfg["algorithm"] == "scaffold":
                new = [ck[i] - c[i] + (params[i] - yk[i]) / (cfg["local_steps"] * cfg["local_lr"])
                       for i in range(len(params))]
                dcs[k] = [a - b for a, b in zip(new, ck)]
                c_i[k] = new
        if cfg["algorithm"] == "scaffold":
            x_bar = [np.mean([models[k][i] for k in sampled], axis=0) for i in range(len(params))]
            dc = [np.mean([dcs[k][i] for k in sampled], axis=0) for i in range(len(params))]
            c = [ci + len(sampled) / len(clients) * d for ci, d in zip(c, dc)]
        else:
            x_bar = [sum(n[k] * models[k][i] for k in sampled) / sum(n.values()) for i in range(len(params))]
        if cfg["algorithm"] == "fedga_1sync":
            if g_hat is not None:  # the starts' common shift β(ḡ − ĝ) taken back out
                x_bar = [xb - cfg["beta"] * (gb - gh) for xb, gb, gh in zip(x_bar, g_bar, g_hat)]
            g_hat = g_bar
        delta = [p - xb for p, xb in zip(params, x_bar)]
        if cfg.get("server_optimizer") == "adam":  # Reddi et al. 2021, Algorithm 2
            b1, b2, tau = cfg["server_beta1"], cfg["server_beta2"], cfg["server_epsilon"]
            velocity = [b1 * m + (1 - b1) * d for m, d in zip(velocity, delta)]
            second = [b2 * v + (1 - b2) * d ** 2 for v, d in zip(second, delta)]
            delta = [m / (np.sqrt(v) + tau) for m, v in zip(velocity, second)]
        elif cfg.get("server_momentum"):
            velocity = [cfg["server_momentum"] * v + d for v, d in zip(velocity, delta)]
            delta = velocity
        params = [p - cfg.get("server_lr", 1.0) * d for p, d in zip(params, delta)]
    return params, c_i
