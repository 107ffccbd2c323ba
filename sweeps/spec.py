"""Sweep specs: a base training config, a grid, and per-point resources.

    [sweep]
    name = "fashion_mnist_batch"
    base_config = "train/configs/fashion_mnist.toml"   # relative to the repo or the spec
    workers = 2                                        # Horovod workers per point
    [fixed]          # training keys set for every point
    epochs = 10
    [grid]           # training keys -> list of values; the points are their product
    batch_size = [128, 1024, 8192]
    optimizer = ["sgd", "gradalign"]
    lr = [0.05, 0.1]
    beta = ["lr/2"]  # numbers, or "lr/K" / "lr*K": K times the point's base lr
    seed = [0, 1, 2]

``[[grid]]`` (an array of tables) instead of ``[grid]`` makes the sweep the union
of several grids, e.g. a tuning grid on one seed and the chosen settings on more
seeds; points that two grids share are run once.
    [resources]      # what one SLURM array task asks for
    cpus_per_task = 1
    gpus_per_task = 0
    time = "01:00:00"
    max_concurrent = 4
    partition = ""

A point's identity is a hash of its resolved training config and worker count,
so a re-run of the sweep finds the points it already has.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from train.config import (DEFAULTS, SECTION_OF, ConfigError, check_batch_split, check_data_fits, merge,
                          read_toml, run_identity, typed, uses_beta, validate)
from hvd_gradalign_base.settings import EMBEDDED_DATASET, EMBEDDED_TRAIN_SAMPLES
from train.launch import quiet_tensorflow_start

REPO = Path(__file__).resolve().parents[1]
RESOURCE_DEFAULTS = {"cpus_per_task": 1, "gpus_per_task": 0, "time": "01:00:00",
                     "max_concurrent": 4, "partition": "", "signal_seconds": 60, "nodes": 0}
SWEEP_KEYS = {"name", "base_config", "workers", "runs_root"}
_BETA_RULE = re.compile(r"^\s*lr\s*([*/])\s*([0-9.eE+-]+)\s*$")


@dataclass
class Point:
    id: str
    config: dict          # the resolved training config (run_dir set)
    workers: int
    params: dict          # the grid values that made this point

    @property
    def run_dir(self) -> Path:
        return Path(typed(self.config).train.run_dir)


@dataclass
class Sweep:
    name: str
    path: Path
    runs_dir: Path
    workers: int
    resources: dict
    points: list = field(default_factory=list)


def _resolve_path(text, spec_path: Path) -> Path:
    p = Path(text)
    if p.is_absolute():
        return p
    for base in (REPO, spec_path.parent):
        if (base / p).exists():
            return base / p
    raise ConfigError(f"{spec_path}: {text} not found (relative paths are taken from the repo or the spec)")


def _beta(value, lr, where):
    if isinstance(value, str):
        m = _BETA_RULE.match(value)
        if not m:
            raise ConfigError(f"{where}: beta rule {value!r} must look like 'lr/2' or 'lr*0.5'")
        k = float(m.group(2))
        return lr / k if m.group(1) == "/" else lr * k
    return value


_SPLIT_SIZES: dict = {}


def available_train_samples(config: dict) -> int:
    """The training split's size less validation, from the dataset's metadata (looked up
    once per dataset); 0 when train_samples is set or the dataset cannot be read here (the
    run then says why)."""
    d = typed(config).data
    if d.train_samples:
        return 0
    key = (d.dataset, d.data_dir)
    if d.dataset == EMBEDDED_DATASET:
        _SPLIT_SIZES[key] = EMBEDDED_TRAIN_SAMPLES
    if key not in _SPLIT_SIZES:
        # The one place the bookkeeping needs TensorFlow (tensorflow-datasets' metadata);
        # every other sweeps command starts without it.
        quiet_tensorflow_start()
        from hvd_gradalign.data import dataset_info, get_builder

        try:
            _SPLIT_SIZES[key] = dataset_info(get_builder(d.dataset, d.data_dir or None)).num_train
        except (ValueError, FileNotFoundError):
            _SPLIT_SIZES[key] = None
    total = _SPLIT_SIZES[key]
    return 0 if total is None else total - d.validation_samples


def point_id(config: dict, workers: int) -> str:
    ident = run_identity(config, ignore={("train", "run_dir")})
    blob = json.dumps({"config": ident, "workers": workers}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load(path, runs_root=None) -> Sweep:
    """A sweep spec's points, each a complete training config that passes the checks
    `python -m train` makes (a point that cannot run is an error here, before any launch)."""
    path = Path(path)
    spec = read_toml(path, "sweep spec")
    head, resources, workers = _head(spec, path)
    runs_dir = Path(runs_root or head.get("runs_root", REPO / "runs")) / head["name"]
    base = _base_config(spec, head, path)
    sweep = Sweep(head["name"], path, runs_dir, workers, resources)
    seen = set()
    for params in _grid_points(spec, path):
        config, params = _point_config(base, params, spec, path)
        _check_point(config, params, workers, path)
        pid = point_id(config, workers)
        if pid in seen:
            continue
        seen.add(pid)
        merge(config, {"train": {"run_dir": str(runs_dir / pid)}}, str(path))
        sweep.points.append(Point(pid, config, workers, params))
    return sweep


def _head(spec, path):
    """[sweep] and [resources], checked: (head, resources, workers)."""
    unknown = set(spec) - {"sweep", "fixed", "grid", "resources"}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; use sweep, fixed, grid, resources")
    head = spec.get("sweep", {})
    bad = set(head) - SWEEP_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown keys in [sweep]: {sorted(bad)}; keys are {sorted(SWEEP_KEYS)}")
    if "name" not in head:
        raise ConfigError(f"{path}: [sweep] needs a name")
    resources = {**RESOURCE_DEFAULTS}
    for key, value in spec.get("resources", {}).items():
        if key not in RESOURCE_DEFAULTS:
            raise ConfigError(f"{path}: unknown key resources.{key}; keys are {sorted(RESOURCE_DEFAULTS)}")
        resources[key] = value
    workers = int(head.get("workers", 1))
    if workers < 1:
        raise ConfigError(f"{path}: sweep.workers must be >= 1")
    return head, resources, workers


def _sectioned(flat, where, path):
    out: dict = {}
    for key, value in flat.items():
        if key not in SECTION_OF:
            raise ConfigError(f"{path}: unknown training key {key!r} in [{where}]")
        out.setdefault(SECTION_OF[key], {})[key] = value
    return out


def _base_config(spec, head, path):
    """The defaults, then the base config file, then [fixed] (β apart: it may be a ratio
    to each point's lr)."""
    base = copy.deepcopy(DEFAULTS)
    if "base_config" in head:
        base_path = _resolve_path(head["base_config"], path)
        merge(base, read_toml(base_path, "base config"), str(base_path))
    fixed = {k: v for k, v in spec.get("fixed", {}).items() if k != "beta"}
    return merge(base, _sectioned(fixed, "fixed", path), str(path))


def _grid_points(spec, path):
    """Every combination of every [[grid]] table, in order, as {key: value}."""
    grids = spec.get("grid", {})
    grids = grids if isinstance(grids, list) else [grids]
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
            if key not in SECTION_OF:
                raise ConfigError(f"{path}: unknown training key {key!r} in [grid]")
    for grid in grids:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            yield dict(zip(keys, combo))


def _point_config(base, params, spec, path):
    """A point's training config, and its params with β resolved."""
    config = copy.deepcopy(base)
    merge(config, _sectioned({k: v for k, v in params.items() if k != "beta"}, "grid", path), str(path))
    optim = typed(config).optim
    beta = params.get("beta", spec.get("fixed", {}).get("beta", optim.beta))
    beta = _beta(beta, optim.lr, str(path))
    if not uses_beta(config):
        beta = 0.0  # no β for the baselines: their β variants are one point
    params = {**params, "beta": beta}
    merge(config, {"optim": {"beta": float(beta)}, "train": {"verbose": 2}}, str(path))
    return config, params


def _check_point(config, params, workers, path):
    """The checks `python -m train` makes before training, made here so that a point
    that cannot run is never launched."""
    try:
        validate(config)
        check_batch_split(config, workers)
        check_data_fits(config, workers, available_train_samples(config))
    except ConfigError as err:
        what = ", ".join(f"{k}={v}" for k, v in params.items())
        raise ConfigError(f"{path}: the point {what} cannot run: {err}") from None


def to_toml(config: dict) -> str:
    """TOML text of a training config (tables of scalars and lists)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def write_point_config(point) -> Path:
    """The point's resolved training config as point.toml in its run dir (what a
    launcher runs `python -m train --config` on)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    path = point.run_dir / "point.toml"
    path.write_text(to_toml(point.config))
    return path
