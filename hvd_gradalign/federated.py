"""Federated rounds on Horovod: FedAvg, FedGA (two- and one-sync), SCAFFOLD, FedProx (library core).

Clients are virtual: client c lives on worker c % size, so the same run on 1, 2
or N workers samples the same clients and computes the same round up to float
rounding. A round's participants are drawn from (seed, round) alone, the same on
every worker without communication. A worker with no participant in a round
still joins every allreduce (with zeros).

A round is one function of explicit state, in the manner of optax:
``run_round(state, ...) -> state``; ``FederatedState`` holds the global weights,
the server optimizer's momentum, and the algorithms' own state (SCAFFOLD's control
variates, one-sync FedGA's ĝ), which persists across rounds and belongs in checkpoints.
What differs between algorithms is their strategy (``hvd_gradalign_base.strategies``, one
module each: FedAvg, FedProx, SCAFFOLD, FedGA, one-sync FedGA, with their equations):
where a participant starts, what its local steps add to the gradient, what it reports
and how the server averages. The round loop below knows no algorithm by name.

Local training is plain SGD on the client's mini-batches (``local_steps`` of
them, cycling through the client's data in a per-(seed, round, client) order)
with optional weight decay, written out here rather than through a Keras
optimizer so that the correction terms of SCAFFOLD and FedProx enter the
gradient exactly as their papers define them: y ← y − η (∇f_i(y) + λ y + the
strategy's terms).

The new global weights are the n_i-weighted mean x̄ of the participants' models
(SCAFFOLD: the plain mean, as its paper); a server step then moves x along the
pseudo-gradient Δ = x − x̄ (Reddi et al. 2021, "Adaptive Federated Optimization"):

- ``server_optimizer = "sgd"``: v ← m v + Δ; x ← x − η_s v, with ``server_lr`` η_s and
  ``server_momentum`` m (1 and 0: x ← x̄, plain averaging; m > 0: FedAvgM);
- ``server_optimizer = "adam"`` (FedAdam, their Algorithm 2, without bias correction):
  m ← β₁ m + (1 − β₁) Δ; v ← β₂ v + (1 − β₂) Δ²; x ← x − η_s m / (√v + τ), with
  ``server_beta1``, ``server_beta2`` and ``server_epsilon`` τ (their adaptivity, 1e-3).

Any algorithm composes with either server optimizer (SCAFFOLD's c is updated as its
paper says, independent of the server step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

# The settings, their checks and the round costs are TensorFlow-free (the config and the
# reports use them without the trainer); re-exported as part of this module's API.
from hvd_gradalign_base.federated_settings import (  # noqa: F401
    ALGORITHMS,
    GRADIENTS_AT_X,
    ROUND_COST,
    SERVER_OPTIMIZERS,
    SPLITS,
    FederatedConfig,
    FederatedConfigError,
    RoundCost,
    check_participants,
    check_split,
)
from hvd_gradalign_base.strategies import STRATEGIES

from . import distributed

# ---- data splits ---------------------------------------------------------------

def split_iid(labels, clients: int, seed: int) -> list[np.ndarray]:
    """Uniform random equal shards (the remainder of n / clients is dropped)."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    per = n // clients
    return _check_split([np.sort(order[i * per:(i + 1) * per]) for i in range(clients)], n)


def split_label_shards(labels, clients: int, seed: int, iid_fraction: float = 0.0,
                       shards_per_client: int = 1) -> list[np.ndarray]:
    """The reference code's non-IID split: a fraction ``iid_fraction`` of the data is
    spread i.i.d.; the rest is sorted by label and cut into equal contiguous shards,
    ``shards_per_client`` of them per client (1, the reference code: one shard each, so
    as many clients as classes gives one class per client; 2 with shards drawn at
    random is McMahan et al.'s "2 classes per client")."""
    check_split("shards", clients, iid_fraction, shards_per_client)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_iid = int(round(iid_fraction * len(labels)))
    iid, rest = order[:n_iid], order[n_iid:]
    rest = rest[np.argsort(labels[rest], kind="stable")]
    shards = clients * shards_per_client
    per_iid, per_shard = len(iid) // clients, len(rest) // shards
    owner_of = (np.arange(shards) if shards_per_client == 1 else rng.permutation(shards)) % clients
    parts = []
    for i in range(clients):
        mine = [rest[s * per_shard:(s + 1) * per_shard] for s in np.flatnonzero(owner_of == i)]
        parts.append(np.sort(np.concatenate([iid[i * per_iid:(i + 1) * per_iid], *mine])))
    return _check_split(parts, len(labels))


def split_dirichlet(labels, clients: int, seed: int, alpha: float) -> list[np.ndarray]:
    """Per class, client proportions drawn from Dirichlet(alpha) (Hsu et al. 2019)."""
    check_split("dirichlet", clients, alpha=alpha)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(clients)]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
        for c, chunk in enumerate(np.split(idx, cuts)):
            parts[c].extend(chunk.tolist())
    return _check_split([np.sort(np.array(p, dtype=np.int64)) for p in parts], len(labels))


def _check_split(parts, n):
    empty = [c for c, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"the split leaves client(s) {empty[:10]} without data ({n} samples, "
                         f"{len(parts)} clients); use fewer clients, more data or a larger alpha")
    return parts


# ---- rounds --------------------------------------------------------------------

def sample_clients(round_index: int, clients: int, per_round: int, seed: int) -> np.ndarray:
    """The round's participants, without replacement, the same on every worker."""
    check_participants(per_round, clients)
    return np.sort(np.random.default_rng([seed, round_index]).choice(clients, per_round, replace=False))


def owner(client: int, workers: int) -> int:
    return client % workers


@dataclass
class FederatedState:
    """A federated run's state between rounds. While rounds run every entry is a
    ``tf.Variable`` (the trainer converts a restored state on its first round), so a round
    moves nothing through the host; ``to_arrays`` / ``from_arrays`` are the NumPy form for
    checkpoints."""
    weights: list                     # global x
    round: int = 0
    server_velocity: list | None = None        # sgd: v; adam: the first moment m
    server_second_moment: list | None = None   # adam: v
    c: list | None = None             # SCAFFOLD server control variate
    g_estimate: list | None = None    # fedga_1sync: ĝ, the last round's ḡ (None before round 1)
    # SCAFFOLD: every client's c_i, stacked (one variable per weight, a row per client;
    # this worker's clients' rows are the ones it updates), and which rows were set.
    c_stacked: list | None = None
    c_started: set = field(default_factory=set)
    _restored_c: dict = field(default_factory=dict, repr=False)  # from_arrays, until stacked

    @property
    def c_clients(self) -> dict:
        """SCAFFOLD's c_i of this worker's clients that have taken part: client -> list."""
        if self.c_stacked is None:
            return dict(self._restored_c)
        return {c: [v[c] for v in self.c_stacked] for c in sorted(self.c_started)}

    def to_arrays(self) -> dict:
        """Flat numpy arrays for a checkpoint (this worker's c_i included)."""
        out = {f"w{i}": np.asarray(w) for i, w in enumerate(self.weights)}
        out["round"] = np.array(self.round)
        for name, values in (("v", self.server_velocity), ("s", self.server_second_moment),
                             ("c", self.c), ("g", self.g_estimate)):
            for i, v in enumerate(values or ()):
                out[f"{name}{i}"] = np.asarray(v)
        for client, cs in self.c_clients.items():
            for i, v in enumerate(cs):
                out[f"ci{client}_{i}"] = np.asarray(v)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "FederatedState":
        def listed(prefix):
            keys = sorted((k for k in arrays if k[len(prefix):].isdigit() and k.startswith(prefix)),
                          key=lambda k: int(k[len(prefix):]))
            return [np.asarray(arrays[k]) for k in keys] or None

        c_clients: dict = {}
        for k in arrays:
            if k.startswith("ci"):
                client, i = k[2:].split("_")
                c_clients.setdefault(int(client), {})[int(i)] = np.asarray(arrays[k])
        return cls(weights=listed("w"), round=int(arrays["round"]), server_velocity=listed("v"),
                   server_second_moment=listed("s"), c=listed("c"), g_estimate=listed("g"),
                   _restored_c={c: [d[i] for i in sorted(d)] for c, d in c_clients.items()})


def _variables(values):
    return None if values is None else [v if isinstance(v, tf.Variable) else tf.Variable(v, trainable=False)
                                        for v in values]


class FederatedTrainer:
    """Runs rounds of ``config.algorithm`` for a Keras ``model`` and ``loss_fn``
    (``loss_fn(y_true, y_pred)``, mean over the batch) on client datasets given
    as ``(x, y)`` arrays and a list of index arrays (one per client)."""

    def __init__(self, model, loss_fn, x, y, client_indices, config: FederatedConfig):
        config.check(len(client_indices))
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.strategy = STRATEGIES[config.algorithm](config)
        self.x, self.y = x, y
        self.clients = [np.asarray(c) for c in client_indices]
        self.variables = list(model.trainable_variables)
        # The data lives on the device once; a client's steps gather their batches there.
        self._x, self._y = tf.constant(x), tf.constant(y)
        self._grads = tf.function(self._grads_impl, reduce_retracing=True)
        self._train = tf.function(self._local_train_impl, reduce_retracing=True)

    def initial_state(self) -> FederatedState:
        """Root's weights on every worker (a broadcast), zero optimizer/control state."""
        weights = distributed.broadcast_values(self.variables, 0)
        zeros = lambda: [tf.zeros_like(w) for w in weights]  # noqa: E731
        state = FederatedState(weights=weights)
        if self.config.server_momentum or self.config.server_optimizer == "adam":
            state.server_velocity = zeros()
        if self.config.server_optimizer == "adam":
            state.server_second_moment = zeros()
        self.strategy.init_state(state, zeros)
        return self._live(state)

    def _live(self, state: FederatedState) -> FederatedState:
        """``state`` with every entry in a tf.Variable (a restored one is converted once)."""
        state.weights = _variables(state.weights)
        state.server_velocity = _variables(state.server_velocity)
        state.server_second_moment = _variables(state.server_second_moment)
        state.c = _variables(state.c)
        state.g_estimate = _variables(state.g_estimate)
        self.strategy.live(self, state)
        return state

    # -- what the strategies ask of the trainer ------------------------------------------
    num_clients = property(lambda self: len(self.clients))

    @staticmethod
    def variables_of(values):
        """``values`` as trainer state (variables), for a strategy's own entries."""
        return _variables(values)

    def stacked_rows(self, rows: dict, like):
        """Variables shaped as ``like`` with a leading row per client, holding ``rows``
        ({client: list of arrays}) and zeros elsewhere."""
        stacked = [np.zeros((len(self.clients),) + tuple(w.shape), w.dtype.as_numpy_dtype) for w in like]
        for client, values in rows.items():
            for row, v in zip(stacked, values):
                row[client] = v
        return _variables(stacked)

    @staticmethod
    def gather_rows(stacked, rows):
        return [tf.gather(v, rows) for v in stacked]

    # -- clients, in-graph ------------------------------------------------------------
    # Weights are passed explicitly (stateless_call), so the participants that share a
    # batch shape are trained by one compiled call: a loop over those clients around a
    # loop over their K local steps. The host sends the starts and the batch indices and
    # gets the models back (stacked, a row per client), instead of a weight assignment and
    # a gradient fetch per step. Non-trainable state (BatchNorm statistics, dropout seeds)
    # is carried from client to client and written back, as the model's own calls would.
    def _loss_and_grad(self, trainable, non_trainable, xb, yb):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            logits, non_trainable = self.model.stateless_call(trainable, non_trainable, xb, training=True)
            loss = self.loss_fn(yb, logits)
        return loss, tape.gradient(loss, trainable), non_trainable

    def _per_client(self, like, clients, body):
        """Stacked outputs (a row per client, shaped as ``like``) of ``body(i, non_trainable)
        -> (values, non_trainable)`` for i < clients, in one in-graph loop."""
        def step(i, rows, non_trainable):
            values, non_trainable = body(i, non_trainable)
            return i + 1, [ta.write(i, v) for ta, v in zip(rows, values)], non_trainable

        rows = [tf.TensorArray(w.dtype, size=clients, element_shape=w.shape) for w in like]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        _, rows, non_trainable = tf.while_loop(lambda i, *_: i < clients, step,
                                               (tf.constant(0), rows, non_trainable))
        self._write_back(non_trainable)
        return [ta.stack() for ta in rows]

    def _grads_impl(self, weights, idx):
        def body(i, non_trainable):
            _, g, non_trainable = self._loss_and_grad(
                weights, non_trainable, tf.gather(self._x, idx[i]), tf.gather(self._y, idx[i]))
            return g, non_trainable

        return self._per_client(weights, tf.shape(idx)[0], body)

    def _local_train_impl(self, starts, x_global, corrections, batches):
        cfg = self.config

        def client(i, non_trainable):
            def step(k, y, non_trainable):
                idx = batches[i, k]
                _, g, non_trainable = self._loss_and_grad(y, non_trainable, tf.gather(self._x, idx),
                                                          tf.gather(self._y, idx))
                new = []
                for j in range(len(y)):
                    update = g[j] + cfg.weight_decay * y[j]
                    extra = self.strategy.local_term(y[j], x_global[j])
                    if extra is not None:
                        update = update + extra
                    if corrections is not None:
                        update = update + corrections[j][i]
                    new.append(y[j] - cfg.local_lr * update)
                return k + 1, new, non_trainable

            _, y, non_trainable = tf.while_loop(lambda k, *_: k < tf.shape(batches)[1], step,
                                                (tf.constant(0), [s[i] for s in starts], non_trainable))
            return y, non_trainable

        return self._per_client(x_global, tf.shape(batches)[0], client)

    def _write_back(self, non_trainable):
        for v, value in zip(self.model.non_trainable_variables, non_trainable):
            v.assign(value)

    def _assign(self, weights):
        for v, w in zip(self.variables, weights):
            v.assign(w)

    def _batches(self, client, round_index):
        idx = self.clients[client]
        rng = np.random.default_rng([self.config.seed, round_index, client])
        b = min(self.config.local_batch, len(idx))
        order = rng.permutation(idx)
        for k in range(self.config.local_steps):
            start = (k * b) % len(order)
            if start + b > len(order):  # a new pass over the client's data
                order = rng.permutation(idx)
                start = 0
            yield order[start:start + b]

    @staticmethod
    def _by_shape(arrays: dict) -> list[list]:
        """The clients grouped by the shape of their index arrays, in first-seen order:
        one compiled call per group (clients smaller than a local batch have fewer rows)."""
        groups = {}
        for c, a in arrays.items():
            groups.setdefault(a.shape, []).append(c)
        return list(groups.values())

    # -- a round -------------------------------------------------------------------
    # Everything below is TensorFlow ops on the state's variables and the clients' models
    # as tensors; the host draws the round's clients and batch indices and reads V.
    def run_round(self, state: FederatedState, log_variance: bool | None = None
                  ) -> tuple[FederatedState, dict]:
        """One round; ``log_variance`` (default ``config.log_variance``) says whether to
        measure V at x this round. It must be the same on every worker (an allreduce)."""
        cfg, workers, me = self.config, distributed.size(), distributed.rank()
        log_variance = cfg.log_variance if log_variance is None else log_variance
        state = self._live(state)
        x = [tf.identity(w) for w in state.weights]  # x as it was when the round began
        sampled = sample_clients(state.round, len(self.clients), cfg.clients_per_round, cfg.seed)
        mine = [c for c in sampled if owner(c, workers) == me]
        n = {c: float(len(self.clients[c])) for c in sampled}

        starts, grads, metrics = self._starts(state, x, mine, n, log_variance)
        models, reports = self._train_clients(state, x, mine, starts)
        x_bar = self.strategy.aggregate(self, state, x, sampled, n, models, reports, grads, metrics)
        for w, new in zip(state.weights, self._server_step(state, x, [xw - xb for xw, xb in zip(x, x_bar)])):
            w.assign(new)
        state.round += 1
        self._assign(state.weights)
        metrics["clients"] = len(sampled)
        return state, metrics

    def _starts(self, state, x, mine, n, log_variance):
        """Where each of this worker's participants starts (the strategy's), their g_i at
        x when the strategy or ``log_variance`` needs them, and the strategy's metrics."""
        cfg = self.config
        if not self.strategy.gradients_at_x and not log_variance:
            return {c: x for c in mine}, {}, {}
        idx = {c: self.clients[c][:cfg.grad_samples] if cfg.grad_samples else self.clients[c] for c in mine}
        grads = {}
        for group in self._by_shape(idx):
            stacked = self._grads(list(x), tf.constant(np.stack([idx[c] for c in group])))
            grads.update({c: [g[i] for g in stacked] for i, c in enumerate(group)})
        starts, metrics = self.strategy.starts(self, state, x, grads, n)
        return starts, grads, metrics

    def variance(self, grads, g_bar, n):
        """V = n-weighted mean over all participants of ‖g_i − ḡ‖² (what FedGA acts on),
        and V/‖ḡ‖²; ``grads`` holds this worker's participants."""
        sq = lambda ts: tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, tf.float64))) for t in ts])  # noqa: E731
        local_v = tf.add_n([tf.constant(0.0, tf.float64)] + [
            n[c] * sq([g - gb for g, gb in zip(grads[c], g_bar)]) for c in grads])
        v = float(distributed.allreduce_list([local_v], op="sum")[0]) / sum(n.values())
        g_bar_sq = float(sq(g_bar))
        return {"grad_variance": v, "grad_variance_ratio": v / g_bar_sq if g_bar_sq else 0.0}

    def _train_clients(self, state, x, mine, starts):
        """Each participant's model after its K local steps, and what the strategy has
        it report besides."""
        batches = {c: np.stack(list(self._batches(c, state.round))) for c in mine}
        models, reports = {}, {}
        for group in self._by_shape(batches):
            rows = tf.constant(group)
            stacked_starts = [tf.stack([starts[c][j] for c in group]) for j in range(len(x))]
            y = self._train(stacked_starts, list(x), self.strategy.corrections(self, state, rows),
                            tf.constant(np.stack([batches[c] for c in group])))
            models.update({c: [w[i] for w in y] for i, c in enumerate(group)})
            reports.update(self.strategy.after_training(self, state, x, rows, group, y))
        return models, reports

    def _server_step(self, state: FederatedState, x, delta):
        """x moved along the pseudo-gradient Δ by the server optimizer (its state updated)."""
        cfg = self.config
        if cfg.server_optimizer == "adam":
            b1, b2 = cfg.server_beta1, cfg.server_beta2
            for m, v, d in zip(state.server_velocity, state.server_second_moment, delta):
                m.assign(b1 * m + (1 - b1) * d)
                v.assign(b2 * v + (1 - b2) * d * d)
            delta = [m / (tf.sqrt(v) + cfg.server_epsilon)
                     for m, v in zip(state.server_velocity, state.server_second_moment)]
        elif cfg.server_momentum:
            for v, d in zip(state.server_velocity, delta):
                v.assign(cfg.server_momentum * v + d)
            delta = state.server_velocity
        return [xw - cfg.server_lr * d for xw, d in zip(x, delta)]

    def weighted_mean(self, values: dict, weights: dict, like):
        """Σ_i w_i v_i / Σ_i w_i over all workers' entries (one allreduce of sums, in
        float64); a worker with no entry sends zeros."""
        total = [tf.zeros(w.shape, tf.float64) for w in like]
        for c, v in values.items():
            total = [t + weights[c] * tf.cast(u, tf.float64) for t, u in zip(total, v)]
        reduced = distributed.allreduce_list(total, op="sum")
        denom = sum(weights.values())
        return [tf.cast(r / denom, w.dtype) for r, w in zip(reduced, like)]
