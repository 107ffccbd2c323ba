"""Atomic, resumable checkpoints of a Keras model with its optimizer state.

Layout under a checkpoint root::

    ckpt-000003-000000/model.keras   model + optimizer (incl. GradAlign's config)
    ckpt-000003-000000/state.json    epoch, step within the epoch, anything else
    LATEST                           name of the newest complete checkpoint

A checkpoint is written into a temporary folder, renamed into place, and only
then named in LATEST (itself replaced atomically), so a crash at any moment
leaves the previous checkpoint intact and LATEST pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import keras


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root, model: keras.Model, epoch: int, step: int = 0, keep: int = 2, **state) -> Path:
    """Save ``model`` (with optimizer) as the checkpoint at (``epoch``, ``step``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{epoch:06d}-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    model.save(tmp / "model.keras")
    write_text_atomic(tmp / "state.json", json.dumps({"epoch": epoch, "step": step, **state}))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "LATEST", name)
    complete = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".ckpt-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def latest(root) -> Path | None:
    root = Path(root)
    try:
        name = (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / "state.json").exists() and (path / "model.keras").exists() else None


def load(path):
    """(model, state) of the checkpoint at ``path``; the model comes compiled with its
    optimizer state restored."""
    path = Path(path)
    model = keras.models.load_model(path / "model.keras")
    state = json.loads((path / "state.json").read_text())
    return model, state
