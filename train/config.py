"""Training configuration: defaults, a TOML file, command-line overrides, checks.

Every key lives in one section and has a unique name, so ``--batch-size 4096``
sets ``train.batch_size`` and ``--set optim.beta=0.1`` works for any key.
"""

from __future__ import annotations

import argparse
import copy
import json
import tomllib
import math
from pathlib import Path

from hvd_gradalign.federated import (ALGORITHMS, SERVER_OPTIMIZERS, SPLITS, FederatedConfig,
                                     FederatedConfigError, check_split)
from hvd_gradalign.models import MODELS, NORMS
from hvd_gradalign.optimizers import INNER_OPTIMIZERS, check_alignment_strength
from hvd_gradalign.schedules import DECAYS, SCALING_RULES, WARMUP_STARTS, scaled_learning_rate, warmup_start

DEFAULTS = {
    "data": {
        "dataset": "fashion_mnist",   # the embedded default, or any tfds name with data_dir
        "data_dir": "",               # tfds data dir ("" = the embedded dataset's cache)
        "train_samples": 0,           # 0 = the whole train split (minus validation)
        "subset_seed": -1,            # >= 0: train_samples drawn at random with this seed; -1: the first ones
        "validation_samples": 0,      # held out from the end of the train split
        "test_samples": 0,            # 0 = the whole test split
        "augment": False,             # CIFAR-family crop + flip
    },
    "model": {
        "model": "mlp",
        "norm": "default",            # batch | group | none | default (the model's own)
    },
    "optim": {
        "optimizer": "gradalign",     # sgd (data-parallel) | gradalign
        "inner": "sgd",               # sgd | adam | adamw | lamb
        "lr": 0.05,                   # base learning rate, tuned at reference_batch
        "reference_batch": 128,
        "lr_scaling": "linear",       # linear | sqrt | none
        "warmup_epochs": 0.0,         # > 0: lr ramps linearly to the peak over these epochs
        "warmup_from": "zero",        # zero | lr (Goyal et al.: from lr to the scaled peak)
        "decay": "constant",          # constant | step | cosine
        "decay_epochs": [],           # for step decay
        "decay_factor": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 0.0,
        "clipnorm": 0.0,              # 0 = no clipping (global norm)
        "beta": 0.025,
        "beta_follows_lr": False,     # β = beta × lr(t) / peak lr
        "micro_batches": 4,           # per worker
        "micro_batch_size": 0,        # >0: micro-batches of this many samples instead
        "log_alignment": True,        # sgd: report V (micro-batched first pass, no second)
    },
    "federated": {                    # algorithm != "none": federated rounds instead of epochs
        "algorithm": "none",          # none | fedavg | fedga | scaffold | fedprox
        "clients": 20,
        "clients_per_round": 10,
        "rounds": 100,
        "local_steps": 10,            # K local SGD steps (lr = optim.lr, wd = optim.weight_decay)
        "local_batch": 32,
        "grad_samples": 0,            # fedga: samples for g_i (0 = all the client's data); β = optim.beta
        "mu": 0.01,                   # fedprox
        "split": "shards",            # iid | shards (label-sorted, reference code) | dirichlet
        "iid_fraction": 0.0,          # shards: part of the data spread i.i.d. first
        "shards_per_client": 1,       # shards: label-sorted shards per client (2: ~2 classes each)
        "alpha": 0.1,                 # dirichlet concentration
        "server_optimizer": "sgd",    # sgd (momentum > 0: FedAvgM) | adam (FedAdam, Reddi et al. 2021)
        "server_lr": 1.0,             # 1 with sgd and no momentum: plain averaging
        "server_momentum": 0.0,       # sgd only
        "server_beta1": 0.9,          # adam only
        "server_beta2": 0.99,
        "server_epsilon": 1e-3,       # adam's τ (adaptivity)
        "eval_rounds": 1,             # evaluate test (and validation) every N rounds
        "variance_every": 1,          # measure V at x every N rounds (fedga: every round, free)
    },
    "train": {
        "batch_size": 512,            # GLOBAL batch
        "epochs": 5,
        "seed": 0,
        "run_dir": "runs/default",
        "checkpoint_every": 1,        # epochs
        "eval_every": 1,              # evaluate validation/test every N epochs (and the last)
        "eval_train": False,          # also evaluate the training samples (clean train accuracy)
        "resume": True,               # continue from run_dir's checkpoint if there is one
        "verbose": 2,                 # Keras progress: 0 silent, 1 bar, 2 a line per epoch
    },
}

# The allowed values come from the library's registries (one list per kind).
CHOICES = {
    "optimizer": ("sgd", "gradalign"),
    "inner": INNER_OPTIMIZERS,
    "model": tuple(sorted(MODELS)),
    "lr_scaling": SCALING_RULES,
    "decay": DECAYS,
    "warmup_from": WARMUP_STARTS,
    "norm": ("default",) + NORMS,
    "algorithm": ("none",) + ALGORITHMS,
    "server_optimizer": SERVER_OPTIMIZERS,
    "split": SPLITS,
    "verbose": (0, 1, 2),
}

SECTION_OF = {key: section for section, keys in DEFAULTS.items() for key in keys}

# Keys that may differ between a run and its resumption without changing what it computes.
RUN_NEUTRAL = {("train", "resume"), ("train", "verbose"), ("train", "checkpoint_every"),
               ("train", "eval_every"), ("train", "eval_train")}


# Keys added after runs existed, with the value that computes what those runs did: at that
# value they leave no trace in a run's identity, so adding them renames no run or sweep point.
ADDED_LATER = {("data", "subset_seed"): -1,
               ("optim", "warmup_from"): "lr",  # the old warmup; where it could not ramp it is now refused
               ("federated", "server_optimizer"): "sgd", ("federated", "server_beta1"): 0.9,
               ("federated", "server_beta2"): 0.99, ("federated", "server_epsilon"): 1e-3}


def is_federated(config: dict) -> bool:
    """Whether a config asks for federated rounds (any algorithm but "none") rather than
    distributed epochs."""
    return config.get("federated", {}).get("algorithm", "none") != "none"


def budget(config: dict) -> int:
    """The epochs (federated: rounds) a config asks for."""
    return config["federated"]["rounds"] if is_federated(config) else config["train"]["epochs"]


def run_identity(config: dict, ignore=()) -> dict:
    """The part of a config that decides what a run computes.

    Sections that do not take part leave no trace (a distributed run's [federated]
    defaults), nor do keys added later at their old behaviour's value (ADDED_LATER), so
    that extending the config never renames existing runs and sweep points."""
    skip = RUN_NEUTRAL | set(ignore)
    if config.get("optim", {}).get("warmup_epochs", 0) == 0:
        skip.add(("optim", "warmup_from"))  # no warmup: where it would start changes nothing
    federated = is_federated(config)
    return {s: {k: v for k, v in keys.items()
                if (s, k) not in skip and ADDED_LATER.get((s, k), object()) != v}
            for s, keys in config.items() if s != "federated" or federated}


class ConfigError(ValueError):
    pass


def read_toml(path, what="TOML file") -> dict:
    """A TOML file's tables; a missing file or a syntax error is a ConfigError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None


def resume_conflict(previous: dict, config: dict) -> str | None:
    """Why a run dir holding ``previous`` cannot be continued with ``config``, or None.
    Asking for more (or fewer) epochs is allowed unless the learning-rate schedule
    depends on the total, as cosine decay does."""
    old, new = run_identity(previous), run_identity(config)
    if old == new:
        return None
    old_epochs, new_epochs = old["train"].pop("epochs"), new["train"].pop("epochs")
    if old != new:
        changed = sorted(f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k])
        return f"a different configuration (changed: {', '.join(changed) or 'sections'})"
    if config["optim"]["decay"] == "cosine":
        return (f"train.epochs {old_epochs} -> {new_epochs}: its cosine learning-rate decay is "
                f"spread over {old_epochs} epochs, so continuing would not be the run that "
                f"{new_epochs} epochs would have been")
    return None


def _check_type(key, value, default):
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def merge(config: dict, updates: dict, origin: str) -> dict:
    for section, values in updates.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{origin}: unknown section [{section}]; sections are {sorted(DEFAULTS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                hint = f" (it belongs in [{SECTION_OF[key]}])" if key in SECTION_OF else ""
                raise ConfigError(f"{origin}: unknown key {section}.{key}{hint}; "
                                  f"keys of [{section}] are {sorted(DEFAULTS[section])}")
            config[section][key] = _check_type(f"{section}.{key}", value, DEFAULTS[section][key])
    return config


def _parse_value(key, text):
    default = DEFAULTS[SECTION_OF[key]][key]
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key}: expected true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    if isinstance(default, (int, float, list)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: cannot parse {text!r} as {type(default).__name__}") from err
        return value
    # A string may be written as in TOML ("none", 'none') or bare (none).
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key}: cannot parse {text!r} as a string") from None
    return text


def validate(config: dict) -> dict:
    for section, values in config.items():
        for key, value in values.items():
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{section}.{key} = {value!r}; choose one of {CHOICES[key]}")
    o, t, d = config["optim"], config["train"], config["data"]
    positive = [("train.batch_size", t["batch_size"]), ("train.epochs", t["epochs"]),
                ("optim.lr", o["lr"]), ("optim.reference_batch", o["reference_batch"]),
                ("optim.micro_batches", o["micro_batches"]), ("train.eval_every", t["eval_every"])]
    for name, value in positive:
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    for name in ("lr", "warmup_epochs", "weight_decay", "clipnorm", "decay_factor", "momentum"):
        if not math.isfinite(o[name]):
            raise ConfigError(f"optim.{name} must be a finite number, got {o[name]}")
    try:
        check_alignment_strength("beta", o["beta"])
    except ValueError as err:
        raise ConfigError(f"optim.{err}") from None
    for name in ("warmup_epochs", "weight_decay", "clipnorm", "decay_factor"):
        if o[name] < 0:
            raise ConfigError(f"optim.{name} must be >= 0, got {o[name]}")
    if o["micro_batch_size"] < 0:
        raise ConfigError("optim.micro_batch_size must be >= 0 (0 = use optim.micro_batches)")
    for name in ("train_samples", "validation_samples", "test_samples"):
        if d[name] < 0:
            raise ConfigError(f"data.{name} must be >= 0, got {d[name]}")
    if t["checkpoint_every"] < 0:
        raise ConfigError("train.checkpoint_every must be >= 0 (0 = only at the end and on signals)")
    f = config["federated"]
    if is_federated(config):
        for name in ("rounds", "eval_rounds", "variance_every"):
            if f[name] < 1:
                raise ConfigError(f"federated.{name} must be >= 1, got {f[name]}")
        # The library's own rules, named by this config's keys.
        try:
            federated_config(config).check(f["clients"])
            check_split(f["split"], f["clients"], f["iid_fraction"], f["shards_per_client"], f["alpha"])
        except FederatedConfigError as err:
            key = KEY_OF_FEDERATED_FIELD.get(err.field, f"federated.{err.field}")
            raise ConfigError(f"{key} {err.message}") from None
    if d["subset_seed"] < -1:
        raise ConfigError(f"data.subset_seed must be >= 0 (a seeded random subset) or -1 (the first "
                          f"train_samples), got {d['subset_seed']}")
    if d["subset_seed"] >= 0 and not d["train_samples"]:
        raise ConfigError("data.subset_seed draws data.train_samples samples at random, but "
                          "train_samples = 0 takes the whole split; set data.train_samples")
    if o["warmup_epochs"] > 0:
        peak = scaled_learning_rate(o["lr"], t["batch_size"], o["reference_batch"], o["lr_scaling"])
        try:
            warmup_start(o["warmup_from"], o["lr"], peak)
        except ValueError as err:
            raise ConfigError(f"optim.warmup_from = {o['warmup_from']!r}: {err}") from None
    if o["decay"] == "step" and not o["decay_epochs"]:
        raise ConfigError("optim.decay = 'step' needs optim.decay_epochs, e.g. [30, 60]")
    return config


# FederatedConfig fields that come from [optim]; the others are federated.<field>.
KEY_OF_FEDERATED_FIELD = {"local_lr": "optim.lr", "weight_decay": "optim.weight_decay", "beta": "optim.beta"}


def federated_config(config: dict) -> FederatedConfig:
    """The library's FederatedConfig that a training config describes."""
    f, o = config["federated"], config["optim"]
    return FederatedConfig(
        algorithm=f["algorithm"], local_steps=f["local_steps"], local_batch=f["local_batch"],
        local_lr=o["lr"], weight_decay=o["weight_decay"], beta=o["beta"], grad_samples=f["grad_samples"],
        mu=f["mu"], server_optimizer=f["server_optimizer"], server_lr=f["server_lr"],
        server_momentum=f["server_momentum"], server_beta1=f["server_beta1"],
        server_beta2=f["server_beta2"], server_epsilon=f["server_epsilon"],
        clients_per_round=f["clients_per_round"], seed=config["train"]["seed"])


def micro_batches_per_worker(config: dict, workers: int) -> int:
    """micro_batches, or local batch / micro_batch_size when that is set."""
    o = config["optim"]
    if not o["micro_batch_size"]:
        return o["micro_batches"]
    local = config["train"]["batch_size"] // workers
    size = o["micro_batch_size"]
    if local % size or local < size:
        unit = size * workers
        raise ConfigError(
            f"the local batch {local} (global {config['train']['batch_size']} / {workers_phrase(workers)}) "
            f"is not a multiple of optim.micro_batch_size = {size}; use a global batch that is a "
            f"multiple of {unit}, e.g. {_nearest(config['train']['batch_size'], unit)}")
    return local // size


def workers_phrase(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _nearest(value: int, unit: int) -> str:
    """The multiples of ``unit`` next to ``value``, without repeats ("96 or 104", "4")."""
    lower = value - value % unit
    options = [m for m in (lower, lower + unit) if m > 0]
    return " or ".join(str(m) for m in dict.fromkeys(options))


def check_batch_split(config: dict, workers: int) -> None:
    """The global batch must split into equal local batches, one per worker (say so
    before training). Each local batch is then cut into micro-batches of near-equal
    size, so their number need not divide it; micro_batch_size must."""
    if is_federated(config):
        return  # rounds of clients, not global batches
    gb = config["train"]["batch_size"]
    micro_batches_per_worker(config, workers)
    if gb % workers:
        raise ConfigError(
            f"global batch {gb} does not split into {workers_phrase(workers)}; use a multiple of {workers}, "
            f"e.g. {_nearest(gb, workers)}")


def check_data_fits(config: dict, workers: int, available: int) -> None:
    """Every worker must hold at least one local batch of the training samples the
    config leaves it (``available``: the split less validation; 0 if unknown)."""
    if is_federated(config):
        return
    n = config["data"]["train_samples"] or available
    batch = config["train"]["batch_size"]
    if n and n // workers < batch // workers:
        raise ConfigError(
            f"{n} training samples give each of {workers_phrase(workers)} {n // workers}, fewer than one local "
            f"batch of {batch // workers} (global batch {batch}); lower train.batch_size to at most "
            f"{n - n % workers} or use more samples")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a Keras model with data-parallel SGD or GradAlign on Horovod.")
    p.add_argument("--config", help="TOML file (sections: data, model, optim, train)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any key (repeatable)")
    for section, keys in DEFAULTS.items():
        group = p.add_argument_group(f"[{section}]")
        for key, default in keys.items():
            flag = "--" + key.replace("_", "-")
            extra = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
            group.add_argument(flag, dest=f"opt_{key}", default=None, metavar="V",
                               help=f"default: {json.dumps(default)}", **extra)
    return p


def load(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    config = copy.deepcopy(DEFAULTS)
    if args.config:
        merge(config, read_toml(args.config, "config file"), str(args.config))
    overrides: dict = {}
    for item in args.set:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if key not in SECTION_OF:
            raise ConfigError(f"--set {dotted}: unknown key {key!r}")
        overrides.setdefault(section, {})[key] = _parse_value(key, text)
    for key in SECTION_OF:
        text = getattr(args, f"opt_{key}")
        if text is not None:
            overrides.setdefault(SECTION_OF[key], {})[key] = _parse_value(key, text)
    merge(config, overrides, "command line")
    return validate(config)
