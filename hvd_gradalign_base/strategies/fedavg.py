"""FedAvg (McMahan et al. 2017), and the base of every strategy: its hooks do FedAvg's part.

Each participant starts from x and takes K local SGD steps y ← y − η (∇f_i(y) + λ y);
the server averages the models n_i-weighted: x̄ = Σ n_i y_i / Σ n_i.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundCost:
    """What one round costs a participating client in communication: synchronisations
    (round trips with the server) and vectors of the model's size sent up and down."""
    syncs: int
    up: int
    down: int


class FedAvg:
    name = "fedavg"
    cost = RoundCost(syncs=1, up=1, down=1)  # x down, the model up
    # Whether the algorithm itself needs every participant's gradient g_i at x (the
    # trainer computes them then, and otherwise only on rounds that log V).
    gradients_at_x = False

    def __init__(self, config):
        self.config = config

    def init_state(self, state, zeros) -> None:
        """Set the algorithm's own entries of a new ``FederatedState`` (``zeros()``: a
        zero list shaped as the weights)."""

    def live(self, trainer, state) -> None:
        """Turn the algorithm's entries of a restored state into the trainer's variables."""

    def starts(self, trainer, state, x, grads, n):
        """({participant: start}, metrics) for this worker's participants, given their
        gradients at x (``grads``, when computed) and sample counts ``n`` (all workers')."""
        g_bar = trainer.weighted_mean(grads, n, like=x)
        return {c: x for c in grads}, trainer.variance(grads, g_bar, n)

    def local_term(self, y, x):
        """What a local step adds to the gradient of one weight ``y`` (x: the round's
        start), or None. Runs inside the compiled client loop."""
        return None

    def corrections(self, trainer, state, rows):
        """A correction per weight, a row per client of ``rows``, added to every local
        step's gradient, or None."""
        return None

    def after_training(self, trainer, state, x, rows, group, models) -> dict:
        """Update the clients' own state after their local steps; returns what each of
        ``group`` reports besides its model ({client: list}), or {}."""
        return {}

    def aggregate(self, trainer, state, x, sampled, n, models, reports, grads, metrics):
        """x̄ from all workers' participants (``models``, ``reports``: this worker's)."""
        return trainer.weighted_mean(models, n, like=x)


STRATEGY = FedAvg
