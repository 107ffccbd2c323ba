"""FedProx (Li et al. 2020): every local step is pulled back to the round's start,
y ← y − η (∇f_i(y) + λ y + μ (y − x)); the server averages as FedAvg."""

from __future__ import annotations

from .fedavg import FedAvg, RoundCost


class FedProx(FedAvg):
    name = "fedprox"
    cost = RoundCost(syncs=1, up=1, down=1)

    def local_term(self, y, x):
        return self.config.mu * (y - x)


STRATEGY = FedProx
