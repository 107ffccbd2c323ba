"""SCAFFOLD (Karimireddy et al. 2020, option II): every local step is corrected by the
control variates, y ← y − η (∇f_i(y) + λ y − c_i + c); after K steps
c_i⁺ = c_i − c + (x − y_i) / (K η), and the server moves c ← c + (|S|/N) · mean_S (c_i⁺ − c_i).
The models and the changes of the c_i are averaged plainly (not n-weighted), as the paper
does. x and c down, the model and the change of c_i up."""

from __future__ import annotations

from .fedavg import FedAvg, RoundCost


class Scaffold(FedAvg):
    name = "scaffold"
    cost = RoundCost(syncs=1, up=2, down=2)

    def init_state(self, state, zeros):
        state.c = zeros()

    def live(self, trainer, state):
        if state.c_stacked is None:  # every client's c_i, a row per client, from the checkpoint's rows
            state.c_stacked = trainer.stacked_rows(state._restored_c, like=state.weights)
            state.c_started, state._restored_c = set(state._restored_c), {}

    def corrections(self, trainer, state, rows):
        ci = trainer.gather_rows(state.c_stacked, rows)
        return [c[None] - c_i for c, c_i in zip(state.c, ci)]

    def after_training(self, trainer, state, x, rows, group, models):
        cfg = self.config
        ci = trainer.gather_rows(state.c_stacked, rows)
        delta = [(xw[None] - yw) / (cfg.local_steps * cfg.local_lr) - c[None]
                 for xw, yw, c in zip(x, models, state.c)]  # new c_i − c_i
        for v, c_i, d in zip(state.c_stacked, ci, delta):
            v.scatter_nd_update(rows[:, None], c_i + d)
        state.c_started.update(group)
        return {c: [d[i] for d in delta] for i, c in enumerate(group)}

    def aggregate(self, trainer, state, x, sampled, n, models, reports, grads, metrics):
        ones = {c: 1.0 for c in sampled}
        x_bar = trainer.weighted_mean(models, ones, like=x)
        dc = trainer.weighted_mean(reports, ones, like=x)
        for c, d in zip(state.c, dc):
            c.assign_add(len(sampled) / trainer.num_clients * d)
        return x_bar


STRATEGY = Scaffold
