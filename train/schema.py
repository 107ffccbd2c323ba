"""The run configuration's schema: one dataclass per TOML section, its keys with their
types, defaults and meaning, and the rules on each section's own values.

Rules that the library owns are the library's: β's with GradAlign
(``check_alignment_strength``), the federated ones with ``FederatedConfig`` and
``check_split``, warmup's with the schedules. A section only names its keys in their
errors. Rules that cross sections (how the batch splits, where a warmup starts, the
federated settings that come from [optim]) are ``train.config``'s.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from hvd_gradalign_base.federated_settings import ALGORITHMS, SERVER_OPTIMIZERS, SPLITS, FederatedConfigError, check_split
from hvd_gradalign_base.settings import (DECAYS, INNER_OPTIMIZERS, MODEL_NAMES, NORMS, SAM_SCOPES, SCALING_RULES,
                                         WARMUP_STARTS, check_alignment_strength, check_learning_rate,
                                         check_micro_batches, check_weight_decay)


class ConfigError(ValueError):
    pass


# optim.optimizer's values: the data-parallel baseline and the two-pass family.
OPTIMIZERS = ("sgd", "gradalign", "sam", "grad_penalty")

# federated.algorithm's value for a distributed run (epochs of global batches, no rounds).
NOT_FEDERATED = "none"


def key(default, help: str, choices: tuple = ()):
    """A config key: its default, what it means (shown by ``--help``) and, for a key
    with a fixed set of values, those values."""
    kind = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(metadata={"help": help, "choices": tuple(choices)}, **kind)


class Section:
    """What every section shares: its name in TOML, its keys, and the checks of its
    own values (``check`` in a subclass adds the rest)."""

    name: typing.ClassVar[str]

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def key_type(cls, name: str) -> type:
        hint = typing.get_type_hints(cls)[name]
        return typing.get_origin(hint) or hint

    @classmethod
    def defaults(cls) -> dict:
        return dataclasses.asdict(cls())

    def check(self) -> None:
        for name, f in self.keys().items():
            choices = f.metadata["choices"]
            if choices and getattr(self, name) not in choices:
                raise ConfigError(f"{self.name}.{name} = {getattr(self, name)!r}; choose one of {choices}")

    def _at_least(self, bound, names, strict=False, why=""):
        for n in names:
            value = getattr(self, n)
            if value < bound or (strict and value == bound):
                raise ConfigError(f"{self.name}.{n} must be {'>' if strict else '>='} {bound}{why}, got {value}")


@dataclass
class DataSection(Section):
    name: typing.ClassVar[str] = "data"
    dataset: str = key("fashion_mnist", "the embedded default, or any tfds name with data_dir")
    data_dir: str = key("", "tfds data dir (\"\" = the embedded dataset's cache)")
    train_samples: int = key(0, "0 = the whole train split (minus validation)")
    subset_seed: int = key(-1, ">= 0: train_samples drawn at random with this seed; -1: the first ones")
    validation_samples: int = key(0, "held out from the end of the train split")
    test_samples: int = key(0, "0 = the whole test split")
    augment: bool = key(False, "CIFAR-family crop + flip")

    def check(self):
        super().check()
        self._at_least(0, ("train_samples", "validation_samples", "test_samples"))
        if self.subset_seed < -1:
            raise ConfigError(f"data.subset_seed must be >= 0 (a seeded random subset) or -1 (the first "
                              f"train_samples), got {self.subset_seed}")
        if self.subset_seed >= 0 and not self.train_samples:
            raise ConfigError("data.subset_seed draws data.train_samples samples at random, but "
                              "train_samples = 0 takes the whole split; set data.train_samples")


@dataclass
class ModelSection(Section):
    name: typing.ClassVar[str] = "model"
    model: str = key("mlp", "the architecture", tuple(sorted(MODEL_NAMES)))
    norm: str = key("default", "batch | group | none | default (the model's own)", ("default",) + NORMS)


@dataclass
class OptimSection(Section):
    name: typing.ClassVar[str] = "optim"
    optimizer: str = key("gradalign", "sgd (data-parallel) | gradalign | sam | grad_penalty "
                         "(the two-pass family: docs/algorithm.md)", OPTIMIZERS)
    inner: str = key("sgd", "the optimizer that applies the averaged gradient", INNER_OPTIMIZERS)
    lr: float = key(0.05, "base learning rate, tuned at reference_batch")
    reference_batch: int = key(128, "the batch lr was tuned at (for lr_scaling)")
    lr_scaling: str = key("linear", "linear | sqrt | none", SCALING_RULES)
    warmup_epochs: float = key(0.0, "> 0: lr ramps linearly to the peak over these epochs")
    warmup_from: str = key("zero", "zero | lr (Goyal et al.: from lr to the scaled peak)", WARMUP_STARTS)
    decay: str = key("constant", "constant | step | cosine", DECAYS)
    decay_epochs: list = key([], "for step decay")
    decay_factor: float = key(0.1, "for step decay")
    momentum: float = key(0.9, "the inner optimizer's momentum")
    nesterov: bool = key(False, "Nesterov momentum")
    weight_decay: float = key(0.0, "the inner optimizer's weight decay")
    clipnorm: float = key(0.0, "0 = no clipping (global norm)")
    beta: float = key(0.025, "grad_penalty's strength β; GradAlign's (and FedGA's) alignment strength β")
    beta_follows_lr: bool = key(False, "β = beta × lr(t) / peak lr")
    rho: float = key(0.05, "sam: the neighbourhood radius ρ")
    sam_scope: str = key("micro_batch", "sam: micro_batch (each micro-batch its own ascent, "
                         "m-sharpness) | global (along the mean gradient)", SAM_SCOPES)
    sam_adaptive: bool = key(False, "sam: adaptive SAM (Kwon et al. 2021), ρ·T²u/‖Tu‖ with T = |x| + 0.01")
    micro_batches: int = key(4, "per worker")
    micro_batch_size: int = key(0, ">0: micro-batches of this many samples instead")
    log_alignment: bool = key(True, "sgd: report V (micro-batched first pass, no second)")

    def check(self):
        super().check()
        self._at_least(0, ("reference_batch",), strict=True)
        try:
            check_learning_rate("lr", self.lr)
            check_micro_batches(self.micro_batches)
            check_weight_decay("weight_decay", self.weight_decay)
        except ValueError as err:
            raise ConfigError(f"optim.{err}") from None
        for n in ("lr", "warmup_epochs", "weight_decay", "clipnorm", "decay_factor", "momentum"):
            if not math.isfinite(getattr(self, n)):
                raise ConfigError(f"optim.{n} must be a finite number, got {getattr(self, n)}")
        for n in ("beta", "rho"):
            try:
                check_alignment_strength(n, getattr(self, n))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"optim.{err}") from None
        self._at_least(0, ("warmup_epochs", "clipnorm", "decay_factor"))
        self._at_least(0, ("micro_batch_size",), why=" (0 = use optim.micro_batches)")
        if self.decay == "step" and not self.decay_epochs:
            raise ConfigError("optim.decay = 'step' needs optim.decay_epochs, e.g. [30, 60]")


@dataclass
class FederatedSection(Section):
    name: typing.ClassVar[str] = "federated"
    algorithm: str = key(NOT_FEDERATED, "none (distributed epochs) | " + " | ".join(ALGORITHMS),
                         (NOT_FEDERATED,) + ALGORITHMS)
    clients: int = key(20, "virtual clients")
    clients_per_round: int = key(10, "participants drawn each round")
    rounds: int = key(100, "the budget of a federated run")
    local_steps: int = key(10, "K local SGD steps (lr = optim.lr, wd = optim.weight_decay)")
    local_batch: int = key(32, "samples per local step")
    grad_samples: int = key(0, "fedga, fedga_1sync: samples for g_i (0 = all the client's data); "
                            "β = optim.beta")
    mu: float = key(0.01, "fedprox's proximal weight")
    split: str = key("shards", "iid | shards (label-sorted, reference code) | dirichlet", SPLITS)
    iid_fraction: float = key(0.0, "shards: part of the data spread i.i.d. first")
    shards_per_client: int = key(1, "shards: label-sorted shards per client (2: ~2 classes each)")
    alpha: float = key(0.1, "dirichlet concentration")
    server_optimizer: str = key("sgd", "sgd (momentum > 0: FedAvgM) | adam (FedAdam, Reddi et al. 2021)",
                                SERVER_OPTIMIZERS)
    server_lr: float = key(1.0, "1 with sgd and no momentum: plain averaging")
    server_momentum: float = key(0.0, "sgd only")
    server_beta1: float = key(0.9, "adam only")
    server_beta2: float = key(0.99, "adam only")
    server_epsilon: float = key(1e-3, "adam's τ (adaptivity)")
    eval_rounds: int = key(1, "evaluate test (and validation) every N rounds")
    variance_every: int = key(1, "measure V at x every N rounds (fedga, fedga_1sync: every round, free)")

    def check(self):
        super().check()
        if self.algorithm == NOT_FEDERATED:
            return  # a distributed run: this section takes no part
        self._at_least(1, ("rounds", "eval_rounds", "variance_every"))
        try:
            check_split(self.split, self.clients, self.iid_fraction, self.shards_per_client, self.alpha)
        except FederatedConfigError as err:
            raise ConfigError(f"federated.{err.field} {err.message}") from None


@dataclass
class TrainSection(Section):
    name: typing.ClassVar[str] = "train"
    batch_size: int = key(512, "GLOBAL batch")
    epochs: int = key(5, "the budget of a distributed run")
    seed: int = key(0, "weights, data order and federated draws")
    run_dir: str = key("runs/default", "checkpoints, metrics and the summary")
    checkpoint_every: int = key(1, "epochs (0 = only at the end and on signals)")
    eval_every: int = key(1, "evaluate validation/test every N epochs (and the last)")
    eval_train: bool = key(False, "also evaluate the training samples (clean train accuracy)")
    resume: bool = key(True, "continue from run_dir's checkpoint if there is one")
    verbose: int = key(2, "Keras progress: 0 silent, 1 bar, 2 a line per epoch", (0, 1, 2))

    def check(self):
        super().check()
        self._at_least(0, ("batch_size", "epochs", "eval_every"), strict=True)
        self._at_least(0, ("checkpoint_every",), why=" (0 = only at the end and on signals)")


SECTIONS: dict[str, type[Section]] = {
    s.name: s for s in (DataSection, ModelSection, OptimSection, FederatedSection, TrainSection)}


@dataclass
class RunConfig:
    """A loaded run configuration as typed sections, what the training code reads
    (``config.optim.lr``); the plain tables (``tables()``) are what config.json, run
    identities and sweep points are made of."""
    data: DataSection
    model: ModelSection
    optim: OptimSection
    federated: FederatedSection
    train: TrainSection

    @classmethod
    def from_tables(cls, tables: dict) -> "RunConfig":
        return cls(**{name: section(**tables[name]) for name, section in SECTIONS.items()})

    def tables(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

