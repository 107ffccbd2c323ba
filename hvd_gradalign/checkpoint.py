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

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras

PAYLOAD = ("model.keras", "state.json")


class CheckpointError(RuntimeError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        # A full disk leaves the old file as it was and no half-written one beside it.
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv_atomic(path, rows, fieldnames) -> None:
    """``rows`` (dicts) as a CSV file, replaced atomically; missing keys stay empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount); the
    checkpoints already there are untouched and its temporary folder is gone."""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _save_error(root: Path, name: str, tmp: Path, err: OSError) -> SaveError:
    written = _size(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    # The model does not grow between checkpoints: the last complete one is the size to free.
    needed = _size(previous[-1]) if previous else written
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
        os.chmod(tmp, 0o777 & ~_umask())
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


def publish(root, name: str, keep: int, pattern: str) -> None:
    """Name the complete checkpoint ``root/name`` in LATEST, then drop all but the
    newest ``keep`` checkpoints matching ``pattern`` and any half-written leftovers
    (for distributed and federated runs alike: one layout of a checkpoint folder)."""
    root = Path(root)
    write_text_atomic(root / "LATEST", name)
    complete = sorted(p for p in root.glob(pattern) if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("." + pattern):
        shutil.rmtree(leftover, ignore_errors=True)


def write_manifest(folder, files) -> None:
    """manifest.json in ``folder``: the size and SHA-256 of each of ``files``, written
    last, so that a folder with a manifest is complete and can be checked."""
    folder = Path(folder)
    manifest = {f: {"size": (folder / f).stat().st_size, "sha256": _digest(folder / f)} for f in files}
    write_text_atomic(folder / "manifest.json", json.dumps(manifest))


def readable_by_umask(path) -> None:
    """Give a file made by mkstemp (0600) the permissions the umask allows."""
    os.chmod(path, 0o666 & ~_umask())


def verify(path) -> str | None:
    """Why the checkpoint at ``path`` is damaged, or None when it is intact: every file
    its manifest lists is there with the size and checksum it was written with."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest.json (incomplete)"
    except json.JSONDecodeError:
        return "manifest.json is damaged"
    for name in manifest:
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != manifest[name]["size"]:
            return f"{name} has {f.stat().st_size} bytes, {manifest[name]['size']} were written"
        if _digest(f) != manifest[name]["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest(root, warn=print, pattern="ckpt-*") -> Path | None:
    """The newest intact checkpoint under ``root``: the one LATEST names, else the
    newest other intact one (``warn`` says what was skipped and why). None when
    there is no checkpoint at all; CheckpointError when there are only damaged ones."""
    root = Path(root)
    try:
        named = (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        named = None
    candidates = sorted((p for p in root.glob(pattern) if p.is_dir()), reverse=True)
    if named:
        candidates = [root / named] + [p for p in candidates if p.name != named]
    if not candidates:
        return None
    skipped = []
    for path in candidates:
        problem = verify(path)
        if problem is None:
            if skipped:
                warn(f"warning: skipped damaged checkpoint(s) {'; '.join(skipped)}; resuming from {path.name}")
            return path
        skipped.append(f"{path.name}: {problem}")
    raise CheckpointError(
        f"no intact checkpoint in {root} ({'; '.join(skipped)}). To start this run over, delete "
        f"{root}.")


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
