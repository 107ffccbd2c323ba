"""FedGA (Dandi, Barba, Jaggi 2022, Fig. 1): g_i = ∇f_i(x) on the client's data (or its
first ``grad_samples``), ḡ their n-weighted mean over the participants (one allreduce),
and each client starts from y_i = x + β (g_i − ḡ). Two synchronisations a round: ḡ must
reach the clients before they train (x down, g_i up, ḡ down, the model up)."""

from __future__ import annotations

from .fedavg import FedAvg, RoundCost


class FedGA(FedAvg):
    name = "fedga"
    cost = RoundCost(syncs=2, up=2, down=2)
    gradients_at_x = True

    def starts(self, trainer, state, x, grads, n):
        g_bar = trainer.weighted_mean(grads, n, like=x)
        beta = self.config.beta
        starts = {c: [w + beta * (g - gb) for w, g, gb in zip(x, grads[c], g_bar)] for c in grads}
        return starts, trainer.variance(grads, g_bar, n)


STRATEGY = FedGA
