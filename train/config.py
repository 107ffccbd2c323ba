"""Training configuration filled from a TOML file and the command line, and checked.

The keys, their types, defaults and meaning, and each section's own rules are the
schema's (``train.schema``); this module fills plain tables from TOML and flags and adds
the rules that cross sections. Every key lives in one section and has a unique name, so
``--batch-size 4096`` sets ``train.batch_size`` and ``--set optim.beta=0.1`` works for
any key.
"""

from __future__ import annotations

import argparse
import copy
import json
import tomllib
from pathlib import Path

from hvd_gradalign_base.federated_settings import ALGORITHMS, GRADIENTS_AT_X, FederatedConfig, FederatedConfigError
from hvd_gradalign_base.settings import scaled_learning_rate, warmup_start

from .schema import NOT_FEDERATED, SECTIONS, ConfigError, RunConfig

# The schema's defaults as plain tables: what a run's config.toml, run identities and
# sweep points are made of.
DEFAULTS = {name: section.defaults() for name, section in SECTIONS.items()}

SECTION_OF = {key: section for section, keys in DEFAULTS.items() for key in keys}

# Keys that may differ between a run and its resumption without changing what it computes.
RUN_NEUTRAL = {("train", "resume"), ("train", "verbose"), ("train", "checkpoint_every"),
               ("train", "eval_every"), ("train", "eval_train")}


# Keys added after runs existed, with the value that computes what those runs did: at that
# value they leave no trace in a run's identity, so adding them renames no run or sweep point.
ADDED_LATER = {("data", "subset_seed"): -1,
               ("optim", "warmup_from"): "lr",  # the old warmup; where it could not ramp it is now refused
               ("federated", "server_optimizer"): "sgd", ("federated", "server_beta1"): 0.9,
               ("federated", "server_beta2"): 0.99, ("federated", "server_epsilon"): 1e-3,
               ("optim", "rho"): 0.05, ("optim", "sam_scope"): "micro_batch", ("optim", "sam_adaptive"): False}

# Keys that only one optim.optimizer reads: set away from their defaults for another,
# they would silently do nothing, so they are refused.
SAM_ONLY = (("optim", "rho"), ("optim", "sam_scope"), ("optim", "sam_adaptive"))


# Keys that only distributed epochs read, with what a federated run uses instead. Set
# away from their defaults in a federated run they would silently do nothing: refused.
DISTRIBUTED_ONLY = {
    ("train", "batch_size"): "the clients' batch is federated.local_batch",
    ("train", "epochs"): "a federated run's budget is federated.rounds",
    ("train", "eval_every"): "use federated.eval_rounds",
    ("optim", "optimizer"): "federated.algorithm chooses the algorithm",
    ("optim", "inner"): "clients take plain SGD steps; the server's is federated.server_optimizer",
    ("optim", "momentum"): "clients take plain SGD steps; the server's is federated.server_momentum",
    ("optim", "nesterov"): "clients take plain SGD steps",
    ("optim", "clipnorm"): "clients take plain SGD steps",
    ("optim", "reference_batch"): "optim.lr is the clients' lr as it is",
    ("optim", "lr_scaling"): "optim.lr is the clients' lr as it is",
    ("optim", "warmup_epochs"): "the clients' lr is constant",
    ("optim", "warmup_from"): "the clients' lr is constant",
    ("optim", "decay"): "the clients' lr is constant",
    ("optim", "decay_epochs"): "the clients' lr is constant",
    ("optim", "decay_factor"): "the clients' lr is constant",
    ("optim", "beta_follows_lr"): "FedGA's β is optim.beta as it is",
    ("optim", "micro_batches"): "FedGA's clients are its micro-batches",
    ("optim", "micro_batch_size"): "FedGA's clients are its micro-batches",
    ("optim", "log_alignment"): "V is measured every federated.variance_every rounds",
    ("optim", "rho"): "SAM is an optim.optimizer of distributed runs",
    ("optim", "sam_scope"): "SAM is an optim.optimizer of distributed runs",
    ("optim", "sam_adaptive"): "SAM is an optim.optimizer of distributed runs",
    ("data", "augment"): "federated clients read the images as they are",
}


def is_federated(config: dict) -> bool:
    """Whether a config asks for federated rounds (any algorithm but "none") rather than
    distributed epochs."""
    return config.get("federated", {}).get("algorithm", NOT_FEDERATED) != NOT_FEDERATED


def uses_beta(config: dict) -> bool:
    """Whether optim.beta takes part in what a config computes: GradAlign's or the gradient
    penalty's distributed step, or FedGA's rounds (whatever optim.optimizer says, which
    rounds do not read)."""
    if is_federated(config):
        return config["federated"]["algorithm"] in GRADIENTS_AT_X
    return config["optim"]["optimizer"] in ("gradalign", "grad_penalty")


# What a run is asked to do for how long: continuing a run to a larger budget is the
# same run (see resume_conflict).
BUDGET_KEYS = (("train", "epochs"), ("federated", "rounds"))


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


def typed(config) -> RunConfig:
    """A config's typed form (a RunConfig passes through as it is): the training code and
    the reports read values from this, never from the tables by string. A run's recorded
    config.json may predate keys: those take the value that computes what it did
    (ADDED_LATER), or their default."""
    if isinstance(config, RunConfig):
        return config
    return RunConfig.from_tables({
        section: {key: config.get(section, {}).get(key, ADDED_LATER.get((section, key), default))
                  for key, default in defaults.items()}
        for section, defaults in DEFAULTS.items()})


def with_value(config: dict, section: str, key: str, value) -> dict:
    """A copy of ``config`` with one key changed (checked as ``merge`` checks it)."""
    return merge(copy.deepcopy(config), {section: {key: value}}, "with_value")


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
    Asking for more (or fewer) epochs or rounds is allowed unless the learning-rate
    schedule depends on the total, as cosine decay does (rounds have no schedule)."""
    old, new = run_identity(previous), run_identity(config)
    if old == new:
        return None
    for section, key in BUDGET_KEYS:
        old.get(section, {}).pop(key, None)
        new.get(section, {}).pop(key, None)
    if old != new:
        changed = sorted(f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k])
        return f"a different configuration (changed: {', '.join(changed) or 'sections'})"
    if not is_federated(config) and config["optim"]["decay"] == "cosine":
        before, after = budget(previous), budget(config)
        return (f"train.epochs {before} -> {after}: its cosine learning-rate decay is "
                f"spread over {before} epochs, so continuing would not be the run that "
                f"{after} epochs would have been")
    return None


def _check_type(section, key, value):
    """``value`` as the type the schema gives ``section.key`` (an int where a float is
    expected is taken as that float); anything else is a ConfigError."""
    expected = SECTIONS[section].key_type(key)
    name = f"{section}.{key}"
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {expected.__name__}, got {value!r} ({type(value).__name__})")
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
            config[section][key] = _check_type(section, key, value)
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
            return json.loads(text)
        except json.JSONDecodeError:
            pass
        try:  # TOML's numbers too (nan, inf, 1_000), so that the rules that follow judge them as in a file
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key}: cannot parse {text!r} as {type(default).__name__}") from None
    # A string may be written as in TOML ("none", 'none') or bare (none).
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key}: cannot parse {text!r} as a string") from None
    return text


def validate(config: dict) -> dict:
    """Each section's own rules (the schema's, which name the library's), then the rules
    that cross sections; the first one broken is a ConfigError naming its key."""
    for name, section in SECTIONS.items():
        section(**config[name]).check()
    o, t = config["optim"], config["train"]
    _check_no_silent_keys(config)
    if is_federated(config):
        f = config["federated"]
        try:
            federated_config(config).check(f["clients"])
        except FederatedConfigError as err:
            key = KEY_OF_FEDERATED_FIELD.get(err.field, f"federated.{err.field}")
            raise ConfigError(f"{key} {err.message}") from None
    if o["warmup_epochs"] > 0:
        peak = scaled_learning_rate(o["lr"], t["batch_size"], o["reference_batch"], o["lr_scaling"])
        try:
            warmup_start(o["warmup_from"], o["lr"], peak)
        except ValueError as err:
            raise ConfigError(f"optim.warmup_from = {o['warmup_from']!r}: {err}") from None
    return config


def _check_no_silent_keys(config: dict) -> None:
    """A key the run would not read, set away from its default, is an error that says
    what the run reads instead."""
    if is_federated(config):
        for (section, key), instead in DISTRIBUTED_ONLY.items():
            if config[section][key] != DEFAULTS[section][key]:
                raise ConfigError(
                    f"{section}.{key} = {config[section][key]!r} does nothing in a federated run "
                    f"(federated.algorithm = {config['federated']['algorithm']!r}): {instead}; "
                    f"remove it or set it back to {DEFAULTS[section][key]!r}")
        return
    if config["optim"]["beta_follows_lr"] and not uses_beta(config):
        raise ConfigError(
            f"optim.beta_follows_lr = true does nothing with optim.optimizer = "
            f"{config['optim']['optimizer']!r} (only gradalign and grad_penalty have a β); remove it")
    if config["optim"]["optimizer"] != "sam":
        for section, key in SAM_ONLY:
            if config[section][key] != DEFAULTS[section][key]:
                raise ConfigError(
                    f"{section}.{key} = {config[section][key]!r} does nothing with optim.optimizer = "
                    f"{config['optim']['optimizer']!r} (only sam reads it); set optim.optimizer = \"sam\" "
                    f"or remove {section}.{key}")
    changed = sorted(k for k, v in config["federated"].items()
                     if k != "algorithm" and v != DEFAULTS["federated"][k])
    if changed:
        raise ConfigError(
            f"federated.{changed[0]} is set, but federated.algorithm = {NOT_FEDERATED!r} (a distributed "
            f"run, which reads no federated key); choose an algorithm ({' | '.join(ALGORITHMS)}) or remove federated.{', federated.'.join(changed)}")


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
    config leaves it (``available``: the split less validation; 0 if unknown), and a
    warmup must come to at least one update."""
    if is_federated(config):
        return
    n = config["data"]["train_samples"] or available
    batch = config["train"]["batch_size"]
    if n and n // workers < batch // workers:
        raise ConfigError(
            f"{n} training samples give each of {workers_phrase(workers)} {n // workers}, fewer than one local "
            f"batch of {batch // workers} (global batch {batch}); lower train.batch_size to at most "
            f"{n - n % workers} or use more samples")
    if n:
        warmup_updates(config, (n // workers) // (batch // workers))  # as hvd_gradalign.data counts steps


def warmup_updates(config: dict, steps_per_epoch: int) -> int:
    """optim.warmup_epochs in updates; a warmup of some epochs that comes to no update is
    refused (before launch when the data's size is known, else when the run starts)."""
    epochs = config["optim"]["warmup_epochs"]
    steps = round(epochs * steps_per_epoch)
    if epochs > 0 and steps == 0:
        raise ConfigError(f"optim.warmup_epochs = {epochs:g} is 0 updates at {steps_per_epoch} steps per "
                          f"epoch, so there would be no warmup; use at least {1 / steps_per_epoch:g} epochs or 0")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a Keras model with data-parallel SGD or GradAlign on Horovod.")
    p.add_argument("--config", help="TOML file (sections: data, model, optim, train)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any key (repeatable)")
    for section, schema in SECTIONS.items():
        group = p.add_argument_group(f"[{section}]")
        for key, spec in schema.keys().items():
            default = DEFAULTS[section][key]
            flag = "--" + key.replace("_", "-")
            extra = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
            group.add_argument(flag, dest=f"opt_{key}", default=None, metavar="V",
                               help=f"{spec.metadata['help']} (default: {json.dumps(default)})", **extra)
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
