"""Federated rounds (FedAvg, FedGA, SCAFFOLD, FedProx) against a float64 NumPy oracle."""

import json

import numpy as np
import pytest

from hvd_gradalign import federated
from tests import federated_scenarios as fs
from tests import oracle as ref
from tests.conftest import horovodrun


def _close(a, b, atol=1e-7):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def one_worker(hvd):
    return {name: fs.run(name) for name in fs.SCENARIOS}


@pytest.mark.parametrize("name", list(fs.SCENARIOS))
def test_one_worker_matches_oracle(one_worker, name):
    expected, _ = fs.oracle(name)
    _close(one_worker[name][0].weights, expected)


def test_scaffold_control_variates_persist_and_match(one_worker):
    state, _ = one_worker["scaffold"]
    _, c_i = fs.oracle("scaffold")
    assert sorted(state.c_clients) == sorted(c_i)  # every client sampled in either round
    one, _ = one_worker["scaffold_one_per_round"]
    assert len(one.c_clients) == fs.ROUNDS
    for k in c_i:
        _close(state.c_clients[k], c_i[k])
    assert any(np.abs(v).max() > 1e-3 for v in state.c)


def test_zero_strength_is_fedavg(one_worker):
    base = one_worker["fedavg"][0].weights
    for name in ("fedga_beta0", "fedga_1sync_beta0", "fedprox_mu0"):
        _close(one_worker[name][0].weights, base, atol=0)
    for name in ("fedga", "fedga_1sync", "fedprox", "scaffold"):
        assert max(np.abs(a - b).max() for a, b in zip(one_worker[name][0].weights, base)) > 1e-4


def test_server_adam_moves_differently_from_averaging(one_worker):
    plain, adam = one_worker["scaffold"][0], one_worker["scaffold_server_adam"][0]
    assert max(np.abs(a - b).max() for a, b in zip(adam.weights, plain.weights)) > 1e-4
    assert plain.server_second_moment is None
    assert all(np.all(v >= 0) for v in adam.server_second_moment)
    assert any(np.abs(v).max() > 0 for v in adam.server_velocity)


def test_fedga_with_one_full_batch_step_is_gradalign(hvd):
    """K = 1 on each client's whole data, all clients, equal sizes: GradAlign with one
    micro-batch per client."""
    import keras

    from tests.scenarios import build_model, initial_params

    x, y = fs.data()
    clients = federated.split_iid(y, 6, seed=0)
    cfg = federated.FederatedConfig(algorithm="fedga", local_steps=1, local_batch=len(clients[0]),
                                    local_lr=0.3, beta=0.4, clients_per_round=6)
    trainer = federated.FederatedTrainer(build_model("softmax", initial_params("softmax")),
                                         keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                         x, y, clients, cfg)
    state, _ = trainer.run_round(trainer.initial_state())
    params = initial_params("softmax")
    h, _, _ = ref.gradalign_direction(ref.softmax_regression_grad, params,
                                      [(x[c], y[c]) for c in clients], 0.4)
    _close(state.weights, [p - 0.3 * g for p, g in zip(params, h)])


@pytest.mark.parametrize("name", ["scaffold", "scaffold_server_adam", "fedga_1sync"])
def test_resume_from_state_equals_uninterrupted(one_worker, tmp_path, name):
    straight, _ = one_worker[name]
    # one round, through the checkpoint arrays, then the second round
    import keras

    from tests.scenarios import build_model, initial_params

    x, y = fs.data()
    cfg = fs.config(name)
    make = lambda: federated.FederatedTrainer(  # noqa: E731
        build_model("softmax", initial_params("softmax")),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y, fs.split(), cfg)
    state, _ = make().run_round(make().initial_state())
    np.savez(tmp_path / "state.npz", **state.to_arrays())
    restored = federated.FederatedState.from_arrays(dict(np.load(tmp_path / "state.npz")))
    assert (restored.server_second_moment is not None) == ("adam" in name)
    assert (restored.g_estimate is not None) == (name == "fedga_1sync")  # ĝ travels in the checkpoint
    resumed, _ = make().run_round(restored)
    _close(resumed.weights, straight.weights, atol=0)
    assert resumed.round == 2


def test_skipping_the_variance_pass_leaves_the_round_unchanged(hvd):
    """V at x is a measurement: a round without it computes the same weights (FedGA
    needs the gradients anyway, so it always reports V)."""
    import keras

    from tests.scenarios import build_model, initial_params

    x, y = fs.data()
    for name in ("fedavg", "fedga"):
        results = {}
        for measure in (True, False):
            cfg = fs.config(name)
            trainer = federated.FederatedTrainer(
                build_model("softmax", initial_params("softmax")),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y, fs.split(), cfg)
            results[measure] = trainer.run_round(trainer.initial_state(), log_variance=measure)
        _close(results[False][0].weights, results[True][0].weights, atol=0)
        assert results[True][1]["grad_variance"] > 0
        assert ("grad_variance" in results[False][1]) == (name == "fedga")


def test_splits():
    y = np.repeat(np.arange(4), 25)
    shards = federated.split_label_shards(y, 4, seed=0)
    assert [len(np.unique(y[s])) for s in shards] == [1, 1, 1, 1]
    mixed = federated.split_label_shards(y, 4, seed=0, iid_fraction=0.5)
    assert all(len(np.unique(y[s])) > 1 for s in mixed)
    two = federated.split_label_shards(y, 4, seed=0, shards_per_client=2)
    assert all(1 <= len(np.unique(y[s])) <= 2 for s in two) and sum(len(s) for s in two) == 8 * 12
    assert any(len(np.unique(y[s])) == 2 for s in two)
    iid = federated.split_iid(y, 3, seed=1)
    assert [len(s) for s in iid] == [33, 33, 33]
    assert len(np.unique(np.concatenate(iid))) == 99
    d1, d2 = federated.split_dirichlet(y, 5, 0, 0.1), federated.split_dirichlet(y, 5, 0, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(d1, d2))
    assert sum(len(s) for s in d1) == 100


def test_sampling_is_the_same_everywhere_and_without_replacement():
    a = federated.sample_clients(3, 47, 10, seed=1)
    assert np.array_equal(a, federated.sample_clients(3, 47, 10, seed=1)) and len(set(a)) == 10
    assert not np.array_equal(a, federated.sample_clients(4, 47, 10, seed=1))


@pytest.mark.parametrize("call, match", [
    (lambda y: federated.sample_clients(0, 5, 6, 0), r"clients_per_round = 6 must be between 1 and the number of clients \(5\)"),
    (lambda y: federated.split_dirichlet(y, 40, 0, 0.01), "without data"),
    (lambda y: federated.split_label_shards(y, 200, 0), "without data"),
    (lambda y: federated.FederatedConfig(local_steps=0).check(5), "local_steps must be >= 1"),
    (lambda y: federated.FederatedConfig(clients_per_round=9).check(5), "clients_per_round = 9 must be between 1 and the number of clients \\(5\\)"),
    (lambda y: federated.FederatedConfig(algorithm="fedsgd").check(5), "choose one of"),
    (lambda y: federated.FederatedConfig(server_optimizer="yogi").check(5), "choose one of"),
    (lambda y: federated.FederatedConfig(server_optimizer="adam", server_momentum=0.9).check(5),
     "server_beta1"),
    (lambda y: federated.FederatedConfig(server_optimizer="adam", server_beta2=1.0).check(5),
     r"server_beta2 must be in \[0, 1\)"),
    # FedGA's β obeys GradAlign's rule (one function): NaN used to pass a "< 0" test
    (lambda y: federated.FederatedConfig(algorithm="fedga", beta=float("nan")).check(5),
     "beta must be a finite number >= 0"),
    (lambda y: federated.FederatedConfig(algorithm="fedga", beta=-1.0).check(5),
     "beta must be a finite number >= 0"),
    # the learning-rate and weight-decay rules are the training config's (one function each)
    (lambda y: federated.FederatedConfig(local_lr=float("inf")).check(5), "local_lr must be a finite number"),
    (lambda y: federated.FederatedConfig(weight_decay=-0.1).check(5), r"weight_decay must be >= 0, got -0\.1"),
])
def test_bad_inputs_are_clear_errors(call, match):
    y = np.repeat(np.arange(4), 25)
    with pytest.raises(ValueError, match=match):
        call(y)


@pytest.mark.horovod
def test_two_workers_equal_one_worker_and_the_oracle(tmp_path, one_worker):
    idle = [federated.sample_clients(r, fs.CLIENTS, 1, fs.SCENARIOS["scaffold_one_per_round"]["seed"])[0] % 2
            for r in range(fs.ROUNDS)]
    assert set(idle) == {0, 1}  # scaffold_one_per_round leaves each worker idle in some round
    horovodrun(2, ["tests/federated_worker.py", tmp_path])
    for rank in (0, 1):
        result = np.load(tmp_path / f"rank{rank}.npz")
        assert int(result["size"]) == 2
        for name in fs.SCENARIOS:
            weights = [result[f"{name}/w{i}"] for i in range(2)]
            _close(weights, one_worker[name][0].weights, atol=1e-10)
            _close(weights, fs.oracle(name)[0])


# ---- the training entry point -------------------------------------------------

FED = ["--config", "train/configs/fashion_mnist_fedga.toml", "--model", "mlp", "--train-samples", "1200",
       "--validation-samples", "0", "--test-samples", "300", "--clients", "6", "--clients-per-round", "3",
       "--local-steps", "2", "--local-batch", "20", "--eval-rounds", "1", "--checkpoint-every", "1",
       "--verbose", "0"]


def _train(run_dir, *args, timeout=300):
    import subprocess
    import sys

    from tests.conftest import REPO
    from train.launch import subprocess_env

    return subprocess.run([sys.executable, "-m", "train", *FED, "--run-dir", str(run_dir), *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _final_weights(run_dir):
    import json

    root = run_dir / "checkpoints"
    name = (root / "LATEST").read_text().strip()
    arrays = dict(np.load(root / name / "state-rank0.npz"))
    n = sum(k.startswith("w") and k[1:].isdigit() for k in arrays)
    return [arrays[f"w{i}"] for i in range(n)], json.loads((root / name / "meta.json").read_text())


@pytest.mark.parametrize("algorithm, extra", [
    ("fedavg", ()), ("scaffold", ()), ("fedprox", ()),
    ("fedga", ("--server-optimizer", "adam", "--server-lr", "0.01")), ("fedga_1sync", ()),
])
def test_entry_point_runs_each_algorithm(tmp_path, algorithm, extra):
    import json

    proc = _train(tmp_path / algorithm, "--algorithm", algorithm, "--rounds", "2", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / algorithm / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["communications"] == (4 if algorithm == "fedga" else 2)
    # the mlp's weights in float32, per participating client: FedAvg/FedProx send 1 model-sized
    # vector up and 1 down a round, the others 2 and 2
    from hvd_gradalign.models import build_model
    model_bytes = 4 * build_model("mlp", (28, 28, 1), 10).count_params()
    vectors = 1 if algorithm in ("fedavg", "fedprox") else 2
    assert rows[-1]["bytes_up"] == rows[-1]["bytes_down"] == 2 * vectors * model_bytes
    for key in ("test_accuracy", "train_loss", "grad_variance", "round_time", "wall_time"):
        assert key in rows[-1], key
    again = _train(tmp_path / algorithm, "--algorithm", algorithm, "--rounds", "2", *extra)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_entry_point_evaluates_the_training_samples_only_when_asked(tmp_path):
    import json

    proc = _train(tmp_path / "no_train_eval", "--algorithm", "fedavg", "--rounds", "1", "--eval-train", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "no_train_eval" / "metrics.json").read_text())[-1]
    assert "test_accuracy" in row and not any(k.startswith("train_") for k in row), row


@pytest.mark.parametrize("flag, value, instead", [
    ("--eval-every", "5", "federated.eval_rounds"), ("--epochs", "3", "federated.rounds"),
    ("--momentum", "0.5", "federated.server_momentum"), ("--warmup-epochs", "1", "constant"),
])
def test_a_distributed_only_key_in_a_federated_run_is_refused(tmp_path, flag, value, instead):
    proc = _train(tmp_path / "refused", "--algorithm", "fedavg", "--rounds", "1", flag, value, timeout=120)
    assert proc.returncode != 0 and "does nothing in a federated run" in proc.stderr and instead in proc.stderr
    assert not (tmp_path / "refused" / "metrics.json").exists()


def test_entry_point_measures_variance_every_n_rounds(tmp_path):
    import json

    proc = _train(tmp_path / "v", "--algorithm", "fedavg", "--rounds", "5", "--variance-every", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "v" / "metrics.json").read_text())
    # rounds 2 and 4, and the last one
    assert [r["round"] for r in rows if "grad_variance" in r] == [2, 4, 5]


def test_entry_point_sigterm_resume_equals_uninterrupted(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from train.launch import subprocess_env

    args = ["--algorithm", "scaffold", "--rounds", "8"]
    assert _train(tmp_path / "straight", *args).returncode == 0
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "train", *FED, "--run-dir", str(run_dir), *args],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    _, meta = _final_weights(run_dir)
    assert 1 <= meta["round"] < 8
    resumed = _train(run_dir, *args)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]
    a, _ = _final_weights(tmp_path / "straight")
    b, meta = _final_weights(run_dir)
    assert meta["round"] == 8
    _close(a, b, atol=1e-6)


def test_entry_point_more_rounds_continue_a_finished_run_as_a_straight_one(tmp_path):
    """A finished 3-round run asked for 5 continues from its checkpoint and ends where a
    straight 5-round run ends (the draws are per (seed, round, client) and no schedule
    depends on the total); round 3's forced V measurement changes nothing."""
    import json

    args = ["--algorithm", "fedga", "--variance-every", "2"]
    assert _train(tmp_path / "straight", *args, "--rounds", "5").returncode == 0
    run_dir = tmp_path / "raised"
    assert _train(run_dir, *args, "--rounds", "3").returncode == 0
    more = _train(run_dir, *args, "--rounds", "5")
    assert more.returncode == 0 and "resuming" in more.stdout and "at round 3" in more.stdout, more.stderr[-3000:]
    a, _ = _final_weights(tmp_path / "straight")
    b, meta = _final_weights(run_dir)
    assert meta["round"] == 5
    _close(a, b, atol=1e-6)
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())] == [1, 2, 3, 4, 5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_done"] == 5
    other = _train(run_dir, *args, "--rounds", "6", "--local-steps", "3")
    assert other.returncode == 2 and "changed: federated.local_steps" in other.stderr, other.stderr[-3000:]


def test_entry_point_signal_during_the_first_round_ends_the_run_at_once(tmp_path):
    """The same fault, the same behaviour as a distributed run: nothing was trained, so
    the run exits at once with a summary (tracing the first round can outlast the 5 s
    horovodrun gives) and a re-run starts it."""
    import json
    import sys

    from tests.conftest import signal_while_tracing

    run_dir = tmp_path / "early"
    args = ["--algorithm", "fedga", "--rounds", "1"]
    rc, out = signal_while_tracing([sys.executable, "-m", "train", *FED, "--run-dir", str(run_dir), *args],
                                   "per round")
    assert rc == 75 and "before the first step" in out, out[-3000:]
    assert not (run_dir / "checkpoints").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_done"] == 0
    rerun = _train(run_dir, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.horovod
def test_entry_point_two_workers_equal_one(tmp_path):
    args = ["--algorithm", "fedga", "--rounds", "2"]
    assert _train(tmp_path / "one", *args).returncode == 0
    horovodrun(2, ["-m", "train", *FED, "--run-dir", tmp_path / "two", *args])
    a, _ = _final_weights(tmp_path / "one")
    b, meta = _final_weights(tmp_path / "two")
    assert meta["workers"] == 2
    _close(a, b, atol=1e-5)


def test_entry_point_bad_federated_config_is_an_early_error(tmp_path):
    proc = _train(tmp_path / "bad", "--clients-per-round", "9")
    assert proc.returncode == 2 and "federated.clients_per_round = 9 must be between 1 and the number of clients (6)" in proc.stderr
    assert not (tmp_path / "bad" / "config.json").exists()


def chosen_beta(result, split):
    return dict(zip(("lr", "beta", "mu"), result["chosen"][(split, "fedga")][0]))["beta"]


def test_federated_sweep_runs_and_reports(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    from train.launch import subprocess_env

    spec = tmp_path / "fed.toml"
    spec.write_text("""
[sweep]
name = "fed"
base_config = "train/configs/fashion_mnist_fedga.toml"
[fixed]
model = "mlp"
lr = 0.05
train_samples = 600
validation_samples = 200
test_samples = 200
clients = 4
clients_per_round = 2
local_steps = 2
local_batch = 20
rounds = 2
eval_rounds = 1
verbose = 0
[[grid]]
algorithm = ["fedavg"]
split = ["iid", "dirichlet"]
[[grid]]
algorithm = ["fedga"]
split = ["iid", "dirichlet"]
beta = [0.01, 0.05]
""")
    runs = tmp_path / "runs"
    run = subprocess.run([sys.executable, "-m", "sweeps", "run", str(spec), "--runs-root", str(runs)],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "6 points" in run.stdout and "6 done" in run.stdout
    from sweeps.report import report

    result = report(runs / "fed")
    assert "| dirichlet(0.1) |" in result["table"] and "| iid |" in result["table"]
    assert "beta=0.01" in result["table"] or "beta=0.05" in result["table"]
    assert len(result["rows"]) == 6 and all(r["status"] == "done" for r in result["rows"])
    assert "Wall time per run (median): fedavg " in result["table"] and ", fedga " in result["table"]
    for beta in (0.01, 0.05):
        assert f"| iid | fedga | {'**' if chosen_beta(result, 'iid') == beta else ''}lr=0.05, beta={beta:g}" \
            in result["table"]
    for split in ("iid", "dirichlet_0_1_"):
        assert (runs / "fed" / f"test_accuracy_vs_rounds_{split}.png").stat().st_size > 1000
    chosen = result["chosen"]

    def mean(split, algorithm):
        seeds = chosen[(split, algorithm)][1]
        return sum(r["test_accuracy"] for r in seeds) / len(seeds)

    diff = 100 * (mean("iid", "fedga") - mean("iid", "fedavg"))
    assert "| fedga − fedavg |" in result["table"] and f"| iid | {diff:+.2f} (n=1) |" in result["table"]
    # A spec that has grown since: the report says it is partial.
    spec.write_text(spec.read_text() + '[[grid]]\nalgorithm = ["fedavg"]\nsplit = ["iid"]\nseed = [1]\n')
    partial = subprocess.run([sys.executable, "-m", "sweeps", "report", str(runs / "fed"), "--spec", str(spec),
                              "--out", str(tmp_path / "rep")], cwd=REPO, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert (tmp_path / "rep" / "table.md").read_text().startswith("PARTIAL: 6 of the 7 points")


def test_a_tfds_dataset_feeds_federated_rounds(hvd, tmp_path):
    """Any tfds dataset, not only the embedded one: mock CIFAR-10 arrays, a Dirichlet
    split, a FedGA round that moves the weights and reports V."""
    import keras
    import tensorflow_datasets as tfds

    from hvd_gradalign.data import load_arrays
    from hvd_gradalign.models import build_model

    with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path)):
        info, (x, y), validation, (x_test, _) = load_arrays("cifar10", str(tmp_path), validation_samples=16,
                                                          test_samples=8)
    assert x.shape == (48, 32, 32, 3) and validation[0].shape == (16, 32, 32, 3) and len(x_test) == 8
    clients = federated.split_dirichlet(y, 4, seed=0, alpha=10.0)
    model = build_model("mlp", info.input_shape, info.num_classes)
    cfg = federated.FederatedConfig(algorithm="fedga", local_steps=2, local_batch=4, local_lr=0.05,
                                    beta=0.02, clients_per_round=2)
    trainer = federated.FederatedTrainer(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                         x, y, clients, cfg)
    start = trainer.initial_state()
    before = [np.array(w) for w in start.weights]  # the state is updated in place
    state, metrics = trainer.run_round(start)
    assert metrics["grad_variance"] > 0 and state.round == 1
    assert max(np.abs(a - b).max() for a, b in zip(state.weights, before)) > 0


def test_differences_against_fedavg_are_paired_by_seed():
    from sweeps.federated_report import _against_fedavg

    rows = lambda accs: [{"seed": s, "test_accuracy": a} for s, a in accs.items()]  # noqa: E731
    chosen = {("iid", "fedavg"): ((0.1,), rows({0: 0.80, 1: 0.70})),
              ("iid", "fedga"): ((0.1,), rows({0: 0.82, 1: 0.74, 2: 0.10})),  # seed 2 has no pair
              ("iid", "scaffold"): ((0.1,), rows({5: 0.9}))}
    lines = _against_fedavg(chosen, ["iid"], ["fedavg", "fedga", "scaffold"])
    assert "| iid | +3.00 ± 1.41 (n=2) | – |" in lines


def test_a_longer_horizon_is_its_own_cell_not_another_seed(tmp_path):
    """The same setting and seed at 300 and (continued) at 1,000 rounds: two readings, each
    with n = 1, the longer one labelled with its horizon."""
    from sweeps.federated_report import report

    def run(name, algorithm, rounds, test):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        config = {"federated": {"algorithm": algorithm, "split": "shards", "shards_per_client": 2,
                                "rounds": rounds, "mu": 0.0},
                  "optim": {"lr": 0.1, "beta": 0.05}, "train": {"seed": 0}}
        history = [{"round": r, "communications": r, "test_accuracy": test * r / rounds,
                    "val_accuracy": test * r / rounds, "wall_time": float(r)} for r in range(10, rounds + 1, 10)]
        (d / "config.json").write_text(json.dumps(config))
        (d / "metrics.json").write_text(json.dumps(history))
        (d / "summary.json").write_text(json.dumps({"status": "finished", "rounds_done": rounds,
                                                    "epochs_done": rounds}))

    run("avg300", "fedavg", 300, 0.80)
    run("avg1000", "fedavg", 1000, 0.85)
    (tmp_path / "runs" / "avg1000" / "continued_from.json").write_text(json.dumps(
        {"run": "avg300", "epochs_done": 300, "wall_time": 300.0}))  # as sweeps/extend.py leaves it
    run("prox300", "fedprox", 300, 0.81)
    result = report(sorted((tmp_path / "runs").iterdir()), tmp_path, at="final")
    assert "| shards×2 | 80.00 (lr=0.1, n=1) | 81.00 (lr=0.1, n=1) |" in result["table"]
    assert "| shards×2, 1000 rounds | 85.00 (lr=0.1, n=1) | – |" in result["table"]
    assert (tmp_path / "test_accuracy_vs_rounds_shards_2__1000_rounds.png").stat().st_size > 1000
    # wall time per horizon; the total counts the copied 300 rounds once: 1,600 s less 300
    assert ("fedavg at 300 rounds 300 s, fedavg at 1000 rounds 1000 s, fedprox at 300 rounds 300 s; "
            "total 0.36 h over 3 runs (a continued run counts only its own part)") in result["table"]
    continued = next(r for r in result["rows"] if r["id"] == "avg1000")
    assert continued["continued_from"] == "avg300" and continued["own_wall_time"] == 700.0


def test_equal_synchronisations_reads_fedga_over_half_its_rounds_and_equal_bytes_reads_1sync_so():
    """FedGA's round costs 2 synchronisations: over FedAvg's 4 rounds (4 synchronisations)
    FedGA is read over its first 2 rounds, at its best validation there, paired by seed;
    one-sync FedGA costs FedAvg's synchronisations but twice its bytes (x and ĝ down, the
    model and g_i up), so it is read over all 4 rounds at equal synchronisations and over
    its first 2 at equal bytes."""
    from sweeps.federated_report import _at_equal_cost, _round_costs

    def history(tests, vals):
        return [{"round": r + 1, "test_accuracy": t, "val_accuracy": v} for r, (t, v) in enumerate(zip(tests, vals))]

    curves = {"a0": {"history": history([0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.7, 0.8])},
              "g0": {"history": history([0.55, 0.65, 0.9, 0.95], [0.6, 0.5, 0.9, 0.99])},
              "s0": {"history": history([0.52, 0.62, 0.72, 0.85], [0.6, 0.5, 0.7, 0.9])}}
    chosen = {("iid", "fedavg"): ((0.1,), [{"id": "a0", "seed": 0}]),
              ("iid", "fedga"): ((0.1,), [{"id": "g0", "seed": 0}]),
              ("iid", "fedga_1sync"): ((0.1,), [{"id": "s0", "seed": 0}])}
    algorithms = ["fedavg", "fedga", "fedga_1sync"]
    lines = _at_equal_cost(chosen, curves, ["iid"], algorithms, "best_val", "synchronisations")
    assert "| iid | 4 | 80.00 (n=1) | 55.00 (n=1) | 85.00 (n=1) | -25.00 | +5.00 |" in lines
    final = _at_equal_cost(chosen, curves, ["iid"], algorithms, "final", "synchronisations")
    assert "| iid | 4 | 80.00 (n=1) | 65.00 (n=1) | 85.00 (n=1) | -15.00 | +5.00 |" in final
    # bytes: FedAvg sends 2 vectors a round (8 in 4 rounds), both FedGAs 4 (2 rounds fit)
    by_bytes = _at_equal_cost(chosen, curves, ["iid"], algorithms, "final", "bytes")
    assert "| iid | 8 | 80.00 (n=1) | 65.00 (n=1) | 62.00 (n=1) | -15.00 | -18.00 |" in by_bytes
    assert _at_equal_cost({("iid", "fedavg"): chosen[("iid", "fedavg")]}, curves, ["iid"],
                          ["fedavg"], "final") == []  # one cost per round: nothing to add
    assert _at_equal_cost(chosen, curves, ["iid"], ["fedavg", "fedga_1sync"], "final", "synchronisations") == []
    assert "fedga_1sync 1 synchronisation, 2 model-sized vectors up and 2 down" in _round_costs(algorithms)[1]


def test_trend_averages_the_ten_evaluations_ending_at_each_round_paired_by_seed():
    """The 'where the curves flatten' table: at rounds 100, 200, ... up to the shortest
    run, each run's test accuracy over its 10 evaluations ending there, mean over seeds,
    and the paired difference to FedAvg."""
    from sweeps.federated_report import _trend

    def history(rounds, test):  # evaluated every 5 rounds, V-only rows between
        return [{"round": r, **({"test_accuracy": test(r)} if r % 5 == 0 else {})} for r in range(1, rounds + 1)]

    curves = {"a0": {"history": history(250, lambda r: 0.5)}, "a1": {"history": history(200, lambda r: 0.4)},
              "g0": {"history": history(250, lambda r: r / 1000)}, "g1": {"history": history(200, lambda r: 0.6)}}
    chosen = {("iid", "fedavg"): ((0.1,), [{"id": "a0", "seed": 0}, {"id": "a1", "seed": 1}]),
              ("iid", "fedga"): ((0.1,), [{"id": "g0", "seed": 0}, {"id": "g1", "seed": 1}])}
    lines = _trend(chosen, curves, ["iid"], ["fedavg", "fedga"])
    assert "| iid | round 100 | round 200 |" in lines  # the shortest run ends at 200
    assert "| fedavg (n=2) | 45.0 | 45.0 |" in lines
    # seed 0 at round 100: the mean of rounds 55, 60, ..., 100 is 77.5, i.e. 7.75 %
    assert "| fedga (n=2) | 33.9 | 38.9 |" in lines
    assert "| fedga − fedavg | -11.1 | -6.1 |" in lines  # (7.75 - 50 + 60 - 40) / 2


def test_federated_checkpoints_are_verified_and_readable_by_the_group(tmp_path, hvd):
    """Like the training checkpoints: a manifest with every worker's state file, the
    umask's permissions (not mkstemp's 0600), and a damaged latest checkpoint skipped
    with a warning in favour of the one before."""
    import os
    import stat

    from hvd_gradalign.federated import FederatedState
    from train.federated_run import _load, _save

    old = os.umask(0o022)
    try:
        for r in (1, 2):
            state = FederatedState([np.full(3, float(r))], round=r)
            _save(tmp_path, state, 0, [{"round": r}], wall=float(r))
    finally:
        os.umask(old)
    latest = tmp_path / "checkpoints" / "round-000002"
    assert json.loads((latest / "manifest.json").read_text()).keys() == {"meta.json", "state-rank0.npz"}
    assert stat.S_IMODE((latest / "state-rank0.npz").stat().st_mode) == 0o644
    state, meta = _load(tmp_path, 0, 1)
    assert state.round == 2 and meta["wall_time"] == 2.0
    with open(latest / "state-rank0.npz", "r+b") as f:   # damage it
        f.seek(20)
        f.write(b"\0\0\0\0")
    warnings = []
    state, _ = _load(tmp_path, 0, 1, warn=warnings.append)
    assert state.round == 1 and np.array_equal(state.weights[0], np.full(3, 1.0))
    assert "round-000002: state-rank0.npz does not match its checksum" in warnings[0]
    _save(tmp_path, FederatedState([np.full(3, 3.0)], round=3), 0, [{"round": 3}], wall=3.0)
    # the same publishing as the training checkpoints: LATEST, and the two newest kept
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "round-000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-000002", "round-000003"]
