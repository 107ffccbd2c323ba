"""Atomic, verified, resumable checkpoints of a Keras model with its optimizer state.

Layout under a checkpoint root::

    ckpt-000003-000000/model.keras     model + optimizer (incl. GradAlign's config)
    ckpt-000003-000000/state.json      epoch, step within the epoch, anything else
    ckpt-000003-000000/manifest.json   size and SHA-256 of the two files, written last
    LATEST                             name of the newest complete checkpoint

A checkpoint is written into a temporary folder, renamed into place, and only
then named in LATEST (itself replaced atomically), so a crash at any moment
leaves the previous checkpoint intact and LATEST pointing at a complete one.
The last ``keep`` (2) checkpoints are kept; loading verifies a checkpoint against
its manifest and falls back to the newest intact one, saying which it skipped.
Files and folders get the permissions the umask allows (not the 0600/0700 of
temporary files), so that a group can read results on a shared cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import keras

# The file layer (atomic writes, manifests, LATEST) is TensorFlow-free and shared with the
# sweeps' bookkeeping; it is re-exported here because a checkpoint is made of it.
from hvd_gradalign_base.files import (  # noqa: F401
    CheckpointError,
    SaveError,
    latest,
    publish,
    readable_by_umask,
    size,
    umask,
    verify,
    write_csv_atomic,
    write_manifest,
    write_text_atomic,
)

PAYLOAD = ("model.keras", "state.json")


def _save_error(root: Path, name: str, tmp: Path, err: OSError) -> SaveError:
    written = size(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    # The model does not grow between checkpoints: the last complete one is the size to free.
    needed = size(previous[-1]) if previous else written
    try:
        free = f"{shutil.disk_usage(root).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    kept = f"the last good checkpoint {previous[-1].name} is untouched" if previous else "no earlier checkpoint"
    return SaveError(
        f"could not save checkpoint {name} in {root}: {err.strerror or err} "
        f"({'at least ' if not previous else ''}{needed / 1e6:,.1f} MB needed, {free}); {kept}. "
        "Free space (or point train.run_dir elsewhere) and re-run the same command to resume.")


def save(root, model: keras.Model, epoch: int, step: int = 0, keep: int = 2, **state) -> Path:
    """Save ``model`` (with optimizer) as the checkpoint at (``epoch``, ``step``).
    Raises SaveError when the disk (or anything else) refuses a write."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{epoch:06d}-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        model.save(tmp / "model.keras")
        write_text_atomic(tmp / "state.json", json.dumps({"epoch": epoch, "step": step, **state}))
        write_manifest(tmp, PAYLOAD)
    except OSError as err:
        raise _save_error(root, name, tmp, err) from err
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    publish(root, name, keep, pattern="ckpt-*")
    return final


def load(path):
    """(model, state) of the checkpoint at ``path``; the model comes compiled with its
    optimizer state restored."""
    path = Path(path)
    try:
        model = keras.models.load_model(path / "model.keras")
        state = json.loads((path / "state.json").read_text())
    except Exception as err:  # Keras reports a truncated zip as many different errors
        raise CheckpointError(f"cannot load the checkpoint {path}: {type(err).__name__}: {err}") from err
    return model, state
