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
}


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
                     ref.SGD(lrs[0], spec.get("momentum", 0.0)), lrs=lrs)
