"""Checkpoints: verified on load, fall back to the newest intact one, permissions."""

import json
import os
import stat

import keras
import numpy as np
import pytest

from hvd_gradalign import checkpoint


def _model(value):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights([np.full((3, 2), value, "float32"), np.zeros(2, "float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


@pytest.fixture
def two_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, _model(1.0), epoch=1)
    checkpoint.save(root, _model(2.0), epoch=2)
    return root


def _weight(path):
    model, state = checkpoint.load(path)
    return float(model.get_weights()[0][0, 0]), state["epoch"]


def test_intact_latest_is_used(two_checkpoints):
    assert _weight(checkpoint.latest(two_checkpoints)) == (2.0, 2)


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "model.keras").write_bytes((d / "model.keras").read_bytes()[:100]), "model.keras has 100 bytes"),
    (lambda d: (d / "state.json").write_text(""), "state.json has 0 bytes"),
    (lambda d: (d / "state.json").write_text(json.dumps({"epoch": 9, "step": 0})), "state.json"),
    (lambda d: __import__("shutil").rmtree(d), "missing"),
])
def test_damaged_latest_falls_back_to_the_older_one_with_a_warning(two_checkpoints, damage, reason):
    damage(two_checkpoints / "ckpt-000002-000000")
    warnings = []
    path = checkpoint.latest(two_checkpoints, warn=warnings.append)
    assert _weight(path) == (1.0, 1)
    assert len(warnings) == 1 and "ckpt-000002-000000" in warnings[0] and reason in warnings[0]


def test_no_intact_checkpoint_is_an_error_not_a_restart(two_checkpoints):
    for name in ("ckpt-000001-000000", "ckpt-000002-000000"):
        (two_checkpoints / name / "state.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint.*delete"):
        checkpoint.latest(two_checkpoints, warn=lambda m: None)


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path):
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path / "c", _model(1.0), epoch=1)
        checkpoint.write_text_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for f in (path / "state.json", path / "manifest.json", tmp_path / "r.json", tmp_path / "c" / "LATEST"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
