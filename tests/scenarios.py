"""Training scenarios run by the library on W workers and checked against the
NumPy oracle. Imported in-process (W=1) and by tests/hvd_worker.py under
horovodrun (W=2): both see the same global data and the same initial weights."""

from __future__ import annotations

import numpy as np

D, K, HIDDEN = 5, 3, 6
GLOBAL_BATCH = 32
STEPS = 3
M_TOTAL = 4  # micro-batches per update over all workers


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, D))
    y = rng.integers(0, K, size=GLOBAL_BATCH * STEPS)
    return x, y


def initial_params(kind, seed=1):
    rng = np.random.default_rng(seed)
    if kind == "softmax":
        return [rng.normal(scale=0.5, size=(D, K)), rng.normal(scale=0.1, size=K)]
    return [rng.normal(scale=0.5, size=(D, HIDDEN)), rng.normal(scale=0.1, size=HIDDEN),
            rng.normal(scale=0.5, size=(HIDDEN, K)), rng.normal(scale=0.1, size=K)]


# name -> (model kind, optimizer spec, micro-batches over all workers)
SCENARIOS = {
    "ga_softmax_sgd": ("softmax", dict(lr=0.25, beta=0.5), M_TOTAL),
    "ga_mlp_sgd": ("mlp", dict(lr=0.25, beta=0.5), M_TOTAL),
    "ga_mlp_momentum": ("mlp", dict(lr=0.125, momentum=0.5, beta=0.25), M_TOTAL),
    # β = 2 × lr while the lr steps from 0.25 (update 0) to 0.125 (updates 1, 2)
    "ga_mlp_beta_follows_lr": ("mlp", dict(lr=(0.25, 0.125), beta_lr_ratio=2.0), M_TOTAL),
    "dp_mlp": ("mlp", dict(lr=0.25, distributed=True), None),
    "ga_beta0_mlp": ("mlp", dict(lr=0.25, beta=0.0), "one per worker"),
    # The rest of the two-pass family on the same step (strength in "beta": ρ for SAM).
    "tp_sam_mlp": ("mlp", dict(lr=0.25, method="sam", beta=0.5), M_TOTAL),
    "tp_sam_global_mlp": ("mlp", dict(lr=0.125, momentum=0.5, method="sam_global", beta=0.5), M_TOTAL),
    "tp_asam_softmax": ("softmax", dict(lr=0.25, method="asam", beta=0.5), M_TOTAL),
    "tp_penalty_mlp": ("mlp", dict(lr=0.125, momentum=0.5, method="grad_penalty", beta=0.5), M_TOTAL),
    "tp_penalty_follows_lr": ("mlp", dict(lr=(0.25, 0.125), method="grad_penalty", beta_lr_ratio=2.0), M_TOTAL),
    # Strength 0: exactly the data-parallel step (dp_mlp), bit for bit (one micro-batch per
    # worker, so that the first pass sums what the data-parallel step sums).
    "tp_sam_rho0_mlp": ("mlp", dict(lr=0.25, method="sam", beta=0.0), "one per worker"),
    "tp_penalty0_mlp": ("mlp", dict(lr=0.25, method="grad_penalty", beta=0.0), "one per worker"),
}

# Scenarios whose two-pass step has a strength > 0 (checked against the oracle's method).
TWO_PASS = [n for n, (_, spec, _) in SCENARIOS.items()
            if n.startswith(("ga_", "tp_")) and (spec.get("beta") or spec.get("beta_lr_ratio"))]


def local_slice(x, rank, size):
    """Each update's global batch, cut by rank: worker r holds rows
    [r·G/W, (r+1)·G/W) of every global batch."""
    per = GLOBAL_BATCH // size
    idx = np.concatenate([np.arange(t * GLOBAL_BATCH + rank * per, t * GLOBAL_BATCH + (rank + 1) * per)
                          for t in range(STEPS)])
    return x[idx]


def build_model(kind, params):
    import keras

    layers = [keras.Input((D,), dtype="float64")]
    if kind == "softmax":
        layers.append(keras.layers.Dense(K, dtype="float64"))
    else:
        layers += [keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64"),
                   keras.layers.Dense(K, dtype="float64")]
    model = keras.Sequential(layers)
    model.set_weights(params)
    return model


def make_optimizer(spec, micro_batches):
    import keras

    import hvd_gradalign as hga

    lr = spec["lr"]
    if isinstance(lr, tuple):
        lr = keras.optimizers.schedules.PiecewiseConstantDecay([0], list(lr))
    inner = keras.optimizers.SGD(lr, momentum=spec.get("momentum", 0.0))
    if spec.get("distributed"):
        return hga.DistributedOptimizer(inner)
    method = spec.get("method", "gradalign")
    if method == "grad_penalty":
        if "beta_lr_ratio" in spec:
            return hga.GradientPenalty(inner, strength_lr_ratio=spec["beta_lr_ratio"], micro_batches=micro_batches)
        return hga.GradientPenalty(inner, strength=spec["beta"], micro_batches=micro_batches)
    if method != "gradalign":
        return hga.SAM(inner, rho=spec["beta"], micro_batches=micro_batches, adaptive=method.startswith("asam"),
                       scope="global" if method.endswith("_global") else "micro_batch")
    if "beta_lr_ratio" in spec:
        return hga.GradAlign(inner, beta_lr_ratio=spec["beta_lr_ratio"], micro_batches=micro_batches)
    return hga.GradAlign(inner, beta=spec["beta"], micro_batches=micro_batches)


def run(name, rank, size):
    """Train scenario ``name`` on this worker; return (weights, history)."""
    import keras

    import hvd_gradalign as hga

    kind, spec, m_total = SCENARIOS[name]
    x, y = data()
    # Ranks other than 0 start elsewhere: the broadcast callback must fix that.
    params = initial_params(kind, seed=1 if rank == 0 else 100 + rank)
    model = build_model(kind, params)  # compile alone gives it the GradAlign step: no wrap
    micro = 1 if m_total in (None, "one per worker") else m_total // size
    model.compile(optimizer=make_optimizer(spec, micro),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(local_slice(x, rank, size), local_slice(y, rank, size),
                        batch_size=GLOBAL_BATCH // size, epochs=1, shuffle=False, verbose=0,
                        callbacks=hga.callbacks())
    return model.get_weights(), history.history


def oracle(name):
    """The NumPy oracle's weights and per-update V for scenario ``name``."""
    from tests import oracle as ref

    kind, spec, m_total = SCENARIOS[name]
    x, y = data()
    grad_fn = ref.softmax_regression_grad if kind == "softmax" else ref.mlp_grad
    lr = spec["lr"]
    lrs = [lr[0]] + [lr[1]] * (STEPS - 1) if isinstance(lr, tuple) else [lr] * STEPS
    if "beta_lr_ratio" in spec:
        betas = [spec["beta_lr_ratio"] * v for v in lrs]
    else:
        betas = [spec.get("beta", 0.0)] * STEPS
    m = M_TOTAL if isinstance(m_total, int) else 1  # β = 0: micro-batching changes nothing
    return ref.train(grad_fn, initial_params(kind), x, y, GLOBAL_BATCH, m, betas,
                     ref.SGD(lrs[0], spec.get("momentum", 0.0)), lrs=lrs, method=spec.get("method", "gradalign"))


# Batches that do not split evenly (any batch fit gives GradAlign): the samples each
# worker holds, a local batch of 8 and 3 micro-batches per worker. One worker: batches
# 8, 8, 8, 3 cut into slices [3, 3, 2] and [1, 1, 1]; two workers: 14 samples (batches
# 8, 6) and 10 (batches 8, 2: slices [3, 3, 2] and [1, 1]), so the workers' batches
# differ in size in the second step.
UNEVEN = {
    "uneven_ga": dict(lr=0.25, momentum=0.5, beta=0.5),
    "uneven_beta0": dict(lr=0.25, momentum=0.5, beta=0.0),
    "uneven_sam": dict(lr=0.25, momentum=0.5, method="sam", beta=0.5),
    "uneven_sam_global": dict(lr=0.25, momentum=0.5, method="sam_global", beta=0.5),
    "uneven_penalty": dict(lr=0.25, momentum=0.5, method="grad_penalty", beta=0.5),
}
UNEVEN_SAMPLES = {1: [27], 2: [14, 10]}
UNEVEN_BATCH, UNEVEN_M = 8, 3


def uneven_local(rank, size):
    x, y = data(seed=7)
    counts = UNEVEN_SAMPLES[size]
    start = sum(counts[:rank])
    return x[start:start + counts[rank]], y[start:start + counts[rank]]


def run_uneven(name, rank, size):
    import keras

    import hvd_gradalign as hga

    params = initial_params("mlp", seed=1 if rank == 0 else 100 + rank)
    model = build_model("mlp", params)
    # The loss in float64 too (Keras computes losses in floatx, float32, by default).
    model.compile(optimizer=make_optimizer(UNEVEN[name], UNEVEN_M),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
    x, y = uneven_local(rank, size)
    history = model.fit(x, y, batch_size=UNEVEN_BATCH, epochs=1, shuffle=False, verbose=0,
                        callbacks=hga.callbacks())
    return model.get_weights(), history.history


def oracle_uneven(name, size):
    """The oracle's weights and per-update V: every step's micro-batches over all workers,
    each cut as hvd_gradalign.steps.micro_batch_sizes cuts a local batch."""
    from hvd_gradalign.steps import micro_batch_sizes
    from tests import oracle as ref

    spec = UNEVEN[name]
    # fit hands the model float64 arrays as floatx (float32): the oracle reads what it read.
    local = [(x.astype(np.float32).astype(np.float64), y) for x, y in (uneven_local(r, size) for r in range(size))]
    steps = -(-UNEVEN_SAMPLES[size][0] // UNEVEN_BATCH)
    params, opt, variances = initial_params("mlp"), ref.SGD(spec["lr"], spec["momentum"]), []
    for t in range(steps):
        slices = []
        for x, y in local:
            xb, yb = x[t * UNEVEN_BATCH:(t + 1) * UNEVEN_BATCH], y[t * UNEVEN_BATCH:(t + 1) * UNEVEN_BATCH]
            start = 0
            for n in micro_batch_sizes(len(yb), UNEVEN_M):
                slices.append((xb[start:start + n], yb[start:start + n]))
                start += n
        h, v, _ = ref.two_pass_direction(ref.mlp_grad, params, slices, spec["beta"],
                                         spec.get("method", "gradalign"))
        variances.append(v)
        params = opt.step(params, h)
    return params, variances
