"""The federated settings, their rules and what a round costs, without TensorFlow: the
federated trainer runs on these, and the training config and the sweeps' reports use
them before launch and after (each rule lives here once).
"""

from __future__ import annotations

from dataclasses import dataclass

from hvd_gradalign_base.settings import check_alignment_strength, check_learning_rate, check_weight_decay
from hvd_gradalign_base.strategies import STRATEGIES, RoundCost  # noqa: F401 (RoundCost: part of this API)

# Read from the strategies (one module per algorithm), so that an algorithm is named,
# costed and checked in one place.
ALGORITHMS = tuple(STRATEGIES)
# The algorithms that compute every participant's gradient g_i at x.
GRADIENTS_AT_X = tuple(name for name, s in STRATEGIES.items() if s.gradients_at_x)
ROUND_COST = {name: s.cost for name, s in STRATEGIES.items()}
SERVER_OPTIMIZERS = ("sgd", "adam")


def check_participants(per_round: int, clients: int) -> None:
    """The rule on how many clients a round draws (a FederatedConfigError naming it)."""
    if not 1 <= per_round <= clients:
        raise FederatedConfigError("clients_per_round", f"= {per_round} must be between 1 and the number "
                                                        f"of clients ({clients})")


@dataclass
class FederatedConfig:
    algorithm: str = "fedavg"
    local_steps: int = 10          # K
    local_batch: int = 32
    local_lr: float = 0.05         # η
    weight_decay: float = 0.0      # λ, inside every local step
    beta: float = 0.0              # FedGA
    grad_samples: int = 0          # FedGA: samples of g_i (0 = all the client's data)
    mu: float = 0.0                # FedProx
    server_optimizer: str = "sgd"  # sgd (FedAvgM with momentum) | adam (FedAdam)
    server_lr: float = 1.0
    server_momentum: float = 0.0   # sgd only
    server_beta1: float = 0.9      # adam only
    server_beta2: float = 0.99
    server_epsilon: float = 1e-3   # τ, Reddi et al.'s adaptivity
    clients_per_round: int = 10
    seed: int = 0
    log_variance: bool = True      # V over the participants' gradients at x (costs a pass,
                                   # as much as K·b local samples; FedGA has it for free)

    def check(self, clients: int):
        """Every rule on these values, in one place: `python -m train` and sweep specs
        call it before anything is written or launched (train.config.validate)."""
        def bad(name, message):
            raise FederatedConfigError(name, message)

        if self.algorithm not in ALGORITHMS:
            bad("algorithm", f"= {self.algorithm!r}; choose one of {ALGORITHMS}")
        for name in ("local_steps", "local_batch"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            bad("server_optimizer", f"= {self.server_optimizer!r}; choose one of {SERVER_OPTIMIZERS}")
        if self.server_optimizer == "adam":
            if self.server_momentum:
                bad("server_momentum", "is for server_optimizer = 'sgd'; FedAdam's first moment is server_beta1")
            for name in ("server_beta1", "server_beta2"):
                if not 0 <= getattr(self, name) < 1:
                    bad(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name, rule in (("local_lr", check_learning_rate), ("server_lr", check_learning_rate),
                           ("weight_decay", check_weight_decay)):
            try:
                rule(name, getattr(self, name))
            except ValueError as err:
                bad(name, str(err).removeprefix(f"{name} "))
        if not self.server_epsilon > 0:
            bad("server_epsilon", f"must be > 0, got {self.server_epsilon}")
        try:
            check_alignment_strength("beta", self.beta)
        except ValueError as err:
            bad("beta", str(err).removeprefix("beta "))
        for name in ("mu", "server_momentum", "grad_samples"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        check_participants(self.clients_per_round, clients)


class FederatedConfigError(ValueError):
    """A federated setting that cannot run; ``field`` names it (a FederatedConfig field or
    a split argument), so that a caller can name its own key for it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


SPLITS = ("iid", "shards", "dirichlet")


def check_split(split: str, clients: int, iid_fraction: float = 0.0, shards_per_client: int = 1,
                alpha: float = 1.0) -> None:
    """The rules on a split's arguments (what the data makes of them is _check_split's)."""
    if split not in SPLITS:
        raise FederatedConfigError("split", f"= {split!r}; choose one of {SPLITS}")
    if clients < 1:
        raise FederatedConfigError("clients", f"must be >= 1, got {clients}")
    if split == "shards":
        if not 0.0 <= iid_fraction <= 1.0:
            raise FederatedConfigError("iid_fraction", f"must be in [0, 1], got {iid_fraction}")
        if shards_per_client < 1:
            raise FederatedConfigError("shards_per_client", f"must be >= 1, got {shards_per_client}")
    if split == "dirichlet" and not alpha > 0:
        raise FederatedConfigError("alpha", f"must be > 0 (a Dirichlet concentration), got {alpha}")
