"""Files written so that a crash or a full disk never leaves a half-written one, and
folders (checkpoints) verified against a manifest written last.

No TensorFlow here: the sweeps' bookkeeping (status, reports, restore) uses these
without paying for it; ``hvd_gradalign.checkpoint`` builds Keras checkpoints on them.
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


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CheckpointError(RuntimeError):
    pass


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
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


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount); the
    checkpoints already there are untouched and its temporary folder is gone."""


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


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
    manifest = {f: {"size": (folder / f).stat().st_size, "sha256": digest(folder / f)} for f in files}
    write_text_atomic(folder / "manifest.json", json.dumps(manifest))


def readable_by_umask(path) -> None:
    """Give a file made by mkstemp (0600) the permissions the umask allows."""
    os.chmod(path, 0o666 & ~umask())


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
        if digest(f) != manifest[name]["sha256"]:
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


