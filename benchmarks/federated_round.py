"""How fast does a federated round train, per local sample, against a centralized
Keras ``fit`` of the same model at the same batch size?

    .venv/bin/python benchmarks/federated_round.py [--out benchmarks/results/federated_round.json]

cnn2 on Fashion-MNIST-shaped data with the federated sweep's client sizes (20 clients
of 500 samples, K = 10 local steps of 50 samples). Measured side by side in one
invocation, alternating for ``--rounds`` repetitions so that machine noise hits all
alike (the figure is the median):

- ``centralized_fit``: ``model.fit`` with plain SGD, batch 50, over as many samples as
  one round with 20 clients trains;
- ``fedavg`` and ``fedga`` rounds with 5 and 20 clients per round: local-training
  samples per second (clients × K × batch over the round's wall time; FedGA's extra
  gradient at x and V are part of the round's time but not of its samples).

Writes samples/s for each and its ratio to the centralized fit, and for FedGA also the
ratio counting every sample a gradient is taken on (its gradient at x on all of each
client's 500 samples costs as much as the 10 local steps of 50: the engine's speed,
apart from what the algorithm asks for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENTS, CLIENT_SAMPLES, LOCAL_STEPS, LOCAL_BATCH = 20, 500, 10, 50


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/federated_round.json"))
    parser.add_argument("--rounds", type=int, default=5, help="alternating repetitions")
    parser.add_argument("--core", type=int, help="pin this process to one core (Linux)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    sys.path.insert(0, str(REPO))
    import keras
    import numpy as np

    import hvd_gradalign as hga
    from hvd_gradalign import federated
    from hvd_gradalign.models import build_model

    hga.init()
    rng = np.random.default_rng(0)
    n = CLIENTS * CLIENT_SAMPLES
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)
    clients = federated.split_iid(y, CLIENTS, seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    keras.utils.set_random_seed(0)
    central = build_model("cnn2", (28, 28, 1), 10)
    central.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss, jit_compile=False)
    fit_samples = CLIENTS * LOCAL_STEPS * LOCAL_BATCH

    def centralized_fit():
        central.fit(x[:fit_samples], y[:fit_samples], batch_size=LOCAL_BATCH, epochs=1, verbose=0,
                    shuffle=False)
        return fit_samples

    def federated_round(algorithm, per_round):
        model = build_model("cnn2", (28, 28, 1), 10)
        cfg = federated.FederatedConfig(algorithm=algorithm, local_steps=LOCAL_STEPS, local_batch=LOCAL_BATCH,
                                        local_lr=0.05, beta=0.025, weight_decay=1e-3,
                                        clients_per_round=per_round, log_variance=False)
        trainer = federated.FederatedTrainer(model, loss, x, y, clients, cfg)
        state = trainer.initial_state()

        def one():
            nonlocal state
            state, _ = trainer.run_round(state)
            return per_round * LOCAL_STEPS * LOCAL_BATCH
        return one

    cases = {"centralized_fit": centralized_fit}
    for algorithm in ("fedavg", "fedga"):
        for per_round in (5, 20):
            cases[f"{algorithm}_{per_round}_clients"] = federated_round(algorithm, per_round)
    for case in cases.values():  # warm-up: tracing and first-call costs
        case()
    rates = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            t0 = time.perf_counter()
            samples = case()
            rates[name].append(samples / (time.perf_counter() - t0))
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median["centralized_fit"]
    result = {
        "what": "local-training samples/s of a federated round against a centralized Keras fit, "
                "cnn2, batch 50, one process",
        "machine": {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
                    "platform": platform.platform()},
        "setting": {"clients": CLIENTS, "client_samples": CLIENT_SAMPLES, "local_steps": LOCAL_STEPS,
                    "local_batch": LOCAL_BATCH, "repetitions": args.rounds},
        "samples_per_sec": {k: round(v, 1) for k, v in median.items()},
        "ratio_to_centralized_fit": {k: round(v / base, 3) for k, v in median.items() if k != "centralized_fit"},
        "ratio_counting_fedga_gradient_pass": {
            k: round(v / base * (LOCAL_STEPS * LOCAL_BATCH + CLIENT_SAMPLES) / (LOCAL_STEPS * LOCAL_BATCH), 3)
            for k, v in median.items() if k.startswith("fedga")},
        "all_samples_per_sec": {k: [round(v, 1) for v in r] for k, r in rates.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("samples_per_sec", "ratio_to_centralized_fit",
                                             "ratio_counting_fedga_gradient_pass")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
