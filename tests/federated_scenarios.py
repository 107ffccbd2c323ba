"""Federated scenarios run by the library on W workers and by the NumPy oracle."""

from __future__ import annotations

import numpy as np

from tests.scenarios import D, K, build_model, initial_params

CLIENTS, PER_ROUND, ROUNDS, N = 6, 4, 2, 90  # clients of unequal size (label shards + iid part)

SCENARIOS = {
    "fedavg": dict(algorithm="fedavg", local_steps=3, local_batch=4, local_lr=0.2),
    "fedga": dict(algorithm="fedga", local_steps=3, local_batch=4, local_lr=0.2, beta=0.5),
    # g_i on each client's first 6 samples: participants of equal size share one compiled call
    "fedga_grad_samples": dict(algorithm="fedga", local_steps=3, local_batch=4, local_lr=0.2, beta=0.5,
                               grad_samples=6),
    "fedga_beta0": dict(algorithm="fedga", local_steps=3, local_batch=4, local_lr=0.2, beta=0.0),
    # one synchronisation: round 1 is FedAvg and collects ḡ; round 2 starts from x + β(g_i − ĝ)
    "fedga_1sync": dict(algorithm="fedga_1sync", local_steps=3, local_batch=4, local_lr=0.2, beta=0.5),
    "fedga_1sync_beta0": dict(algorithm="fedga_1sync", local_steps=3, local_batch=4, local_lr=0.2, beta=0.0),
    "scaffold": dict(algorithm="scaffold", local_steps=3, local_batch=4, local_lr=0.2),
    "fedprox": dict(algorithm="fedprox", local_steps=3, local_batch=4, local_lr=0.2, mu=0.5),
    "fedprox_mu0": dict(algorithm="fedprox", local_steps=3, local_batch=4, local_lr=0.2, mu=0.0),
    "fedavg_server_momentum": dict(algorithm="fedavg", local_steps=2, local_batch=5, local_lr=0.2,
                                   server_lr=0.7, server_momentum=0.5, weight_decay=0.01),
    # one participant a round: on 2 workers, one of them has none and still joins every allreduce
    "scaffold_one_per_round": dict(algorithm="scaffold", local_steps=3, local_batch=4, local_lr=0.2,
                                   clients_per_round=1, seed=1),
    "scaffold_server_adam": dict(algorithm="scaffold", local_steps=3, local_batch=4, local_lr=0.2,
                                 server_optimizer="adam", server_lr=0.05, server_beta1=0.8,
                                 server_beta2=0.95, server_epsilon=1e-2),
}


def data(seed=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)), rng.integers(0, K, size=N)


def split():
    from hvd_gradalign import federated

    _, y = data()
    return federated.split_dirichlet(y, CLIENTS, seed=0, alpha=1.0)


def config(name, **overrides):
    """The scenario's FederatedConfig (PER_ROUND participants and seed 5 unless it says)."""
    from hvd_gradalign import federated

    return federated.FederatedConfig(**{"clients_per_round": PER_ROUND, "seed": 5, **SCENARIOS[name], **overrides})


def run(name, **overrides):
    """(weights after ROUNDS rounds, the trainer) for the library on this worker."""
    import keras

    from hvd_gradalign import federated

    x, y = data()
    model = build_model("softmax", initial_params("softmax"))
    cfg = config(name, **overrides)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = federated.FederatedTrainer(model, loss, x, y, split(), cfg)
    state = trainer.initial_state()
    for _ in range(ROUNDS):
        state, _ = trainer.run_round(state)
    return state, trainer


def oracle(name):
    from hvd_gradalign import federated
    from tests import oracle as ref

    x, y = data()
    spec = SCENARIOS[name]
    cfg = config(name)
    trainer = federated.FederatedTrainer.__new__(federated.FederatedTrainer)  # batches only
    trainer.config, trainer.clients = cfg, split()
    sampled = [federated.sample_clients(r, CLIENTS, cfg.clients_per_round, cfg.seed) for r in range(ROUNDS)]
    ocfg = {**spec, "batches": lambda k, r: list(trainer._batches(k, r))}
    return ref.federated_rounds(ref.softmax_regression_grad, initial_params("softmax"), x, y,
                                split(), sampled, ocfg, ROUNDS)
