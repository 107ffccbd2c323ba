"""A sweep survives the machine that ran it: a report written elsewhere saves its runs'
records, and `sweeps restore` puts them back (or, for runs older than that, their rows)."""

import csv
import json
import shutil
import subprocess

import pytest

from hvd_gradalign import checkpoint
from sweeps import archive, estimate, extend, state
from sweeps import spec as sweep_spec
from sweeps.report import report
from tests.test_sweeps import FEDERATED_SPEC, REPO, sweeps_cli, write_spec


def _finish(point, vals, tests, *, round_key="epoch"):
    """A run folder as `python -m train` leaves a finished point: per-evaluation metrics
    whose best validation is not the last (so the readings differ), and a checkpoint."""
    d = point.run_dir
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(point.config))
    (d / "summary.json").write_text(json.dumps({"status": "finished", "epochs_done": len(vals),
                                                "rounds_done": len(vals), "workers": point.workers}))
    history = [{round_key: i + 1, "accuracy": 0.9, "loss": 0.3, "train_loss": 0.3, "val_accuracy": v,
                "test_accuracy": t, "images_per_sec": 100.0, "grad_variance": 1.0 + i,
                "communications": 2 * (i + 1), "wall_time": 10.0 * (i + 1)}
               for i, (v, t) in enumerate(zip(vals, tests))]
    (d / "metrics.json").write_text(json.dumps(history))
    (d / "launcher.json").write_text(json.dumps({"state": "exited", "pid": 123, "host": "elsewhere",
                                                 "returncode": 0, "launcher": "local"}))
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "LATEST").write_text("ckpt")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def finished_sweep(tmp_path):
    """A 6-point sweep, every point finished, and its report published to ``out``."""
    path = write_spec(tmp_path)
    runs = tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)
    for i, p in enumerate(sweep.points):
        _finish(p, vals=[0.80 + i / 100, 0.85 + i / 100, 0.82], tests=[0.70, 0.75 + i / 100, 0.90])
    out = tmp_path / "published"
    first = report(runs / sweep.name, out, at="best_val")
    return path, runs, sweep, out, first


def test_a_published_report_carries_its_records_and_a_fresh_machine_gets_the_sweep_back(finished_sweep, tmp_path):
    path, runs, sweep, out, first = finished_sweep
    saved = sorted(p.name for p in (out / archive.RECORDS).iterdir())
    assert saved == sorted(p.id for p in sweep.points)
    kept = json.loads((out / archive.RECORDS / saved[0] / "launcher.json").read_text())
    assert "pid" not in kept and "host" not in kept
    assert not (out / archive.RECORDS / saved[0] / "checkpoints").exists()

    shutil.rmtree(runs)  # the machine is gone; a fresh clone has the published folder
    fresh = sweep_spec.load(path, runs)
    assert {state.point_state(p.run_dir) for p in fresh.points} == {state.PENDING}
    counts = archive.restore(fresh, out)
    assert counts == {"records": 6, "resumable": 0, "table": 0, "kept": 0}
    assert {state.point_state(p.run_dir) for p in fresh.points} == {state.DONE}
    again = report(runs / sweep.name, tmp_path / "again", at="best_val")
    assert again["table"] == first["table"]
    assert _rows(tmp_path / "again" / "results.csv") == _rows(out / "results.csv")
    # They can be read at any epoch: the per-epoch metrics came back.
    assert "90.00" in report(runs / sweep.name, tmp_path / "final", at="final")["table"]
    # A second restore leaves what is there alone.
    assert archive.restore(fresh, out) == {"records": 0, "resumable": 0, "table": 0, "kept": 6}


def test_runs_older_than_the_records_come_back_from_the_table_at_its_reading_only(finished_sweep, tmp_path):
    path, runs, sweep, out, first = finished_sweep
    rates = estimate.measured_rates(runs / sweep.name)
    shutil.rmtree(runs)
    shutil.rmtree(out / archive.RECORDS)  # a report from before reports saved records
    fresh = sweep_spec.load(path, runs)
    with pytest.raises(ValueError, match="--at best_val, final or last_mean"):
        archive.restore(fresh, out)
    assert not runs.exists() or not any(runs.rglob("summary.json"))  # refused before writing
    assert archive.restore(fresh, out, at="best_val") == {"records": 0, "resumable": 0, "table": 6, "kept": 0}
    assert {state.point_state(p.run_dir) for p in fresh.points} == {state.DONE}
    # Nothing to continue a raised budget from: those points run from the start.
    assert extend._finished_runs(runs / sweep.name) == []
    # `status` still knows what a point costs, from the rows' wall times.
    assert estimate.measured_rates(runs / sweep.name) == rates and rates

    again = report(runs / sweep.name, tmp_path / "again", at="best_val")
    note = archive.restored_note(state.run_dirs(runs / sweep.name))
    assert "6 finished run(s)" in note and note in again["table"]
    assert again["table"].replace(note, "") == first["table"]
    assert _rows(tmp_path / "again" / "results.csv") == _rows(out / "results.csv")
    with pytest.raises(ValueError, match="restored from a table read at best_val"):
        report(runs / sweep.name, tmp_path / "final", at="final")
    # The published folder now carries them as records (restored.json), so the table is
    # no longer needed to restore them.
    shutil.rmtree(runs)
    assert archive.restore(sweep_spec.load(path, runs), tmp_path / "again") == {"records": 6, "resumable": 0, "table": 0, "kept": 0}
    assert report(runs / sweep.name, tmp_path / "third", at="best_val")["table"] == again["table"]
    # A table-only point run again from the start has its own metrics: the next report's
    # records are a full run's, which a restore brings back as one.
    again_run = sweep.points[0]
    shutil.rmtree(again_run.run_dir)
    _finish(again_run, vals=[0.5, 0.6], tests=[0.5, 0.6])
    report(runs / sweep.name, tmp_path / "third", at="best_val")
    assert not (tmp_path / "third" / archive.RECORDS / again_run.id / state.RESTORED).exists()
    shutil.rmtree(runs)
    archive.restore(sweep_spec.load(path, runs), tmp_path / "third")
    assert not (again_run.run_dir / state.RESTORED).exists() and (again_run.run_dir / "metrics.json").exists()


def test_restore_from_the_command_line_says_what_it_needs(finished_sweep, tmp_path):
    path, runs, sweep, out, _ = finished_sweep
    shutil.rmtree(runs)
    shutil.rmtree(out / archive.RECORDS)
    refused = sweeps_cli("restore", path, "--from", out, "--runs-root", runs)
    assert refused.returncode == 2 and "--at best_val" in refused.stderr
    missing = sweeps_cli("restore", path, "--from", tmp_path / "nowhere", "--runs-root", runs)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    done = sweeps_cli("restore", path, "--from", out, "--at", "best_val", "--runs-root", runs)
    assert done.returncode == 0, done.stderr
    assert "0 run(s) from" in done.stdout and "6 from the rows" in done.stdout
    status = sweeps_cli("status", path, "--runs-root", runs)
    assert "6 done, 0 running, 0 failed, 0 interrupted, 0 pending" in status.stdout


def test_a_federated_report_draws_curves_only_for_runs_with_their_rounds(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text(FEDERATED_SPEC.format(name="fed", repo=REPO, workers=1)
                    .replace('algorithm = ["scaffold", "fedga"]', 'algorithm = ["fedavg", "fedga"]')
                    .replace("seed = [0]", "seed = [0, 1]"))
    runs = tmp_path / "runs"
    sweep = sweep_spec.load(path, runs)
    for i, p in enumerate(sweep.points):
        _finish(p, vals=[0.5, 0.6 + i / 100], tests=[0.5, 0.6 + i / 100], round_key="round")
    out = tmp_path / "published"
    first = report(runs / "fed", out, at="best_val")
    assert "(n=2)" in first["table"].split("Where the curves flatten")[1]
    # Lose two runs' records (one per algorithm): they come back from the table alone.
    lost = [p for p in sweep.points if p.config["train"]["seed"] == 1]
    for p in lost:
        shutil.rmtree(out / archive.RECORDS / p.id)
    shutil.rmtree(runs)
    assert archive.restore(sweep_spec.load(path, runs), out, at="best_val") == {"records": 2, "resumable": 0, "table": 2, "kept": 0}
    again = report(runs / "fed", tmp_path / "again", at="best_val")
    assert _rows(tmp_path / "again" / "results.csv") == _rows(out / "results.csv")
    table, trend = again["table"].split("At equal synchronisations")
    assert table == first["table"].split("At equal synchronisations")[0]  # every seed in the tables
    assert "(n=1)" in trend and "(n=2)" not in trend and "2 finished run(s) here were restored" in trend
    # and the report names the runs the curve tables left out, which the first had none of
    left_out = "restored from a results table without them"
    assert left_out not in first["table"]
    assert left_out in trend and "fedavg seed 1; " in trend and "fedga seed 1." in trend
    assert all(f.stat().st_size > 1000 for f in again["plots"])
    # With only table-only runs left there is nothing to draw, and the older plot goes.
    for p in sweep.points:
        if not (p.run_dir / state.RESTORED).exists():
            shutil.rmtree(p.run_dir)
    assert report(runs / "fed", tmp_path / "again", at="best_val")["plots"] == []
    assert not list((tmp_path / "again").glob("*.png"))


def test_the_records_a_report_saves_in_the_repository_are_not_ignored_by_git():
    # They are what `restore` reads on a fresh machine; an ignore rule for the sweeps'
    # working folder (`runs/` at the top) once hid them from every commit.
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    record = f"docs/results/any_sweep/{archive.RECORDS}/0123456789ab/{archive.RECORD_FILES[0]}"
    check = subprocess.run(["git", "check-ignore", "-v", record], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 1, f"git ignores sweep records: {check.stdout.strip()}"
    working = subprocess.run(["git", "check-ignore", "-q", "runs/some_sweep/0123456789ab/config.json"], cwd=REPO)
    assert working.returncode == 0  # the sweeps' working folder stays out of git


def _checkpoint(root, name, pattern, files, payload=b"weights"):
    """A checkpoint folder as training (ckpt-*) or a federated run (round-*) leaves one."""
    folder = root / name
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_bytes(payload + name.encode())
    checkpoint.write_manifest(folder, files)
    checkpoint.publish(root, name, keep=2, pattern=pattern)
    return folder


def _interrupt(point, kind):
    """A point cut short after two checkpoints, the newest of them damaged (a copy cut short)."""
    d = point.run_dir
    _finish(point, vals=[0.8, 0.85], tests=[0.7, 0.75])
    (d / "summary.json").write_text(json.dumps({"status": "interrupted", "epochs_done": 2, "workers": 1}))
    shutil.rmtree(d / "checkpoints")
    pattern, files = {"train": ("ckpt-*", ["model.keras", "state.json"]),
                      "federated": ("round-*", ["meta.json", "state-rank0.npz"])}[kind]
    prefix = pattern[:-1]
    intact = _checkpoint(d / "checkpoints", f"{prefix}000001", pattern, files)
    damaged = _checkpoint(d / "checkpoints", f"{prefix}000002", pattern, files)
    (damaged / files[0]).write_bytes(b"cut")
    return intact, pattern


@pytest.mark.parametrize("kind", ["train", "federated"])
def test_an_interrupted_run_parked_with_its_checkpoint_resumes_on_a_fresh_machine(finished_sweep, tmp_path, kind):
    path, runs, sweep, out, _ = finished_sweep
    cut = sweep.points[0]
    shutil.rmtree(cut.run_dir)
    intact, pattern = _interrupt(cut, kind)
    parked = out / archive.RECORDS / cut.id
    shutil.rmtree(parked)  # it was finished when the fixture's report ran

    # Without being asked, a report saves finished runs only: the interrupted one is not there.
    report(runs / sweep.name, out, at="best_val")
    assert not parked.exists()
    with pytest.raises(ValueError, match="pass --out"):
        report(runs / sweep.name, at="best_val", checkpoints=True)
    assert archive.save(runs / sweep.name, out, checkpoints=True) == {"finished": 5, "parked": 1}
    # Only the newest intact checkpoint is parked, and named in LATEST.
    assert sorted(p.name for p in (parked / "checkpoints").iterdir()) == ["LATEST", intact.name]
    assert (parked / "checkpoints" / "LATEST").read_text() == intact.name
    assert json.loads((parked / "summary.json").read_text())["status"] == "interrupted"

    shutil.rmtree(runs)  # a fresh machine
    fresh = sweep_spec.load(path, runs)
    assert archive.restore(fresh, out) == {"records": 6, "resumable": 1, "table": 0, "kept": 0}
    assert state.point_state(cut.run_dir) == state.INTERRUPTED  # `run` resumes it, not restarts it
    back = checkpoint.latest(cut.run_dir / "checkpoints", pattern=pattern)
    assert back.name == intact.name and checkpoint.verify(back) is None
    assert all((back / f.name).read_bytes() == f.read_bytes() for f in intact.iterdir())

    # Finished since: the next report keeps its records and drops the parked checkpoint.
    shutil.rmtree(cut.run_dir)
    _finish(cut, vals=[0.8, 0.9], tests=[0.7, 0.8])
    assert archive.save(runs / sweep.name, out, checkpoints=True) == {"finished": 6, "parked": 0}
    assert not (parked / "checkpoints").exists()
    assert json.loads((parked / "summary.json").read_text())["status"] == "finished"


def test_a_run_with_only_damaged_checkpoints_is_not_parked(finished_sweep, tmp_path):
    path, runs, sweep, out, _ = finished_sweep
    cut = sweep.points[0]
    shutil.rmtree(cut.run_dir)
    shutil.rmtree(out / archive.RECORDS / cut.id)
    intact, _ = _interrupt(cut, "train")
    (intact / "model.keras").write_bytes(b"cut")
    assert archive.save(runs / sweep.name, out, checkpoints=True) == {"finished": 5, "parked": 0}
    assert not (out / archive.RECORDS / cut.id).exists()
