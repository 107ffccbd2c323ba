"""FedGA with one synchronisation a round: the client starts from y_i = x + β (g_i − ĝ),
where ĝ is the previous round's ḡ, which the participants' g_i built on their way up
beside their models and which comes down with x (x and ĝ down, the model and g_i up).
The starts then no longer average to x: they are shifted by β (ḡ − ĝ) in common, so the
server takes that shift back out of the average, x̄ ← x̄ − β (ḡ − ĝ), which makes the round
agree with two-sync FedGA to first order in β. The first round has no ĝ and is a FedAvg
round that collects ḡ. β = 0 is FedAvg."""

from __future__ import annotations

from .fedavg import FedAvg, RoundCost


class FedGAOneSync(FedAvg):
    name = "fedga_1sync"
    cost = RoundCost(syncs=1, up=2, down=2)
    gradients_at_x = True

    def starts(self, trainer, state, x, grads, n):
        if state.g_estimate is None:
            return {c: x for c in grads}, {}
        beta = self.config.beta
        return {c: [w + beta * (g - gh) for w, g, gh in zip(x, grads[c], state.g_estimate)] for c in grads}, {}

    def aggregate(self, trainer, state, x, sampled, n, models, reports, grads, metrics):
        # ḡ comes up with the models: one allreduce for both.
        both = trainer.weighted_mean({c: list(models[c]) + list(grads[c]) for c in models}, n, like=list(x) * 2)
        x_bar, g_bar = both[:len(x)], both[len(x):]
        if state.g_estimate is None:
            state.g_estimate = trainer.variables_of(g_bar)
        else:
            x_bar = [xb - self.config.beta * (gb - gh) for xb, gb, gh in zip(x_bar, g_bar, state.g_estimate)]
            for gh, gb in zip(state.g_estimate, g_bar):
                gh.assign(gb)
        metrics.update(trainer.variance(grads, g_bar, n))
        return x_bar


STRATEGY = FedGAOneSync
