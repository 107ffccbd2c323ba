"""Config parsing, LR schedules and data sharding of the training entry point."""

import json
import math
import re

import numpy as np
import pytest
import tensorflow as tf

from hvd_gradalign import data
from hvd_gradalign.schedules import WarmupDecay, scaled_learning_rate
from train.config import ConfigError, check_batch_split, load


def test_defaults_and_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[optim]\nlr = 0.1\nbeta = 0.05\n[train]\nbatch_size = 1024\n')
    config = load(["--config", str(cfg), "--batch-size", "4096", "--optimizer", "sgd",
                   "--set", "optim.momentum=0.5", "--nesterov", "true", "--decay-epochs", "[1, 2]",
                   "--decay", "step"])
    assert config["train"]["batch_size"] == 4096
    assert config["optim"]["lr"] == 0.1 and config["optim"]["beta"] == 0.05
    assert config["optim"]["optimizer"] == "sgd"
    assert config["optim"]["momentum"] == 0.5 and config["optim"]["nesterov"] is True
    assert config["optim"]["decay_epochs"] == [1, 2]
    assert load(["--augment"])["data"]["augment"] is True  # a bare boolean flag means true
    assert load(["--resume", "false"])["train"]["resume"] is False


@pytest.mark.parametrize("text, match", [
    ('[optim]\nlearning_rate = 0.1\n', r"unknown key optim\.learning_rate"),
    ('[optim]\nbatch_size = 64\n', r"it belongs in \[train\]"),
    ('[trian]\nepochs = 1\n', r"unknown section \[trian\]"),
    ('[train]\nepochs = "ten"\n', r"train\.epochs: expected int"),
    ('[train]\nepochs = 1.5\n', r"train\.epochs: expected int"),
    ('[optim]\noptimizer = "adam"\n', r"optim\.optimizer = 'adam'; choose one of"),
    ('[optim]\nbeta = -0.1\n', r"optim\.beta must be a finite number >= 0"),
    ('[optim]\ndecay = "step"\n', r"needs optim\.decay_epochs"),
    ('[optim]\nmicro_batches = 0\n', r"optim\.micro_batches must be an integer >= 1, got 0"),
    ('[optim]\nlr = 0.0\n', r"optim\.lr must be > 0, got 0\.0"),
    ('[optim]\nweight_decay = -0.1\n', r"optim\.weight_decay must be >= 0, got -0\.1"),
    ('[train\n', r"c\.toml"),
    ('[federated]\nalgorithm = "fedavg"\nserver_optimizer = "yogi"\n',
     r"federated\.server_optimizer = 'yogi'; choose one of \('sgd', 'adam'\)"),
    ('[federated]\nalgorithm = "fedavg"\nserver_optimizer = "adam"\nserver_momentum = 0.9\n',
     r"server_momentum is for server_optimizer = 'sgd'"),
    ('[federated]\nalgorithm = "fedavg"\nserver_optimizer = "adam"\nserver_beta2 = 1.0\n',
     r"federated\.server_beta2 must be in \[0, 1\)"),
    ('[federated]\nalgorithm = "fedavg"\nserver_optimizer = "adam"\nserver_epsilon = 0.0\n',
     r"federated\.server_epsilon must be > 0"),
    ('[federated]\nalgorithm = "fedavg"\nserver_lr = 0.0\n', r"federated\.server_lr must be > 0, got 0\.0"),
    ('[federated]\nalgorithm = "fedavg"\nsplit = "dirichlet"\nalpha = 0.0\n', r"federated\.alpha must be > 0"),
    ('[federated]\nalgorithm = "fedga"\n[optim]\nlr = 0.0\n', r"optim\.lr must be > 0"),
    ('[federated]\nalgorithm = "fedavg"\nclients_per_round = 30\n',
     r"federated\.clients_per_round = 30 must be between 1 and the number of clients \(20\)"),
    ('[federated]\nalgorithm = "fedavg"\niid_fraction = 1.5\n', r"federated\.iid_fraction must be in \[0, 1\]"),
    # a key the run would not read is refused, not silently ignored
    ('[federated]\nrounds = 7\n', r"federated\.rounds is set, but federated\.algorithm = 'none'"),
    ('[federated]\nalgorithm = "fedga"\n[optim]\nmicro_batch_size = 64\n',
     r"optim\.micro_batch_size = 64 does nothing in a federated run .*clients are its micro-batches"),
    ('[federated]\nalgorithm = "fedavg"\n[train]\nbatch_size = 64\n', r"federated\.local_batch"),
])
def test_config_errors_name_the_key(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(["--config", str(cfg)])


def test_the_schema_is_the_one_source_of_keys_types_meaning_and_section_rules(capsys):
    import dataclasses

    from train.config import DEFAULTS, build_parser
    from train.schema import SECTIONS, DataSection, FederatedSection, OptimSection

    # The tables every run and sweep point are made of are the dataclasses' defaults.
    assert DEFAULTS == {name: dataclasses.asdict(section()) for name, section in SECTIONS.items()}
    # A key's type is its annotation: a float where an int is declared is refused, an int
    # where a float is declared is taken as that float.
    assert OptimSection.key_type("micro_batches") is int and OptimSection.key_type("decay_epochs") is list
    with pytest.raises(ConfigError, match=r"optim\.micro_batches: expected int, got 1\.5"):
        load(["--set", "optim.micro_batches=1.5"])
    assert load(["--set", "optim.beta=1"])["optim"]["beta"] == 1.0
    # Every key says what it means, and --help shows it beside the default.
    helps = {k: f.metadata["help"] for s in SECTIONS.values() for k, f in s.keys().items()}
    assert all(helps.values()), [k for k, h in helps.items() if not h]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "alignment strength β (default: 0.025)" in shown and "GLOBAL batch (default: 512)" in shown
    # A section's rules are its own: the same errors without the command line...
    with pytest.raises(ConfigError, match=r"data\.subset_seed draws data\.train_samples"):
        DataSection(subset_seed=3).check()
    with pytest.raises(ConfigError, match=r"optim\.beta must be a finite number >= 0"):
        OptimSection(beta=float("nan")).check()
    # ...and the federated section's split rule is the library's check_split, named by key,
    # and only for a federated run (a distributed run's [federated] takes no part).
    with pytest.raises(ConfigError, match=r"federated\.alpha must be > 0 \(a Dirichlet concentration\)"):
        FederatedSection(algorithm="fedavg", split="dirichlet", alpha=0.0).check()
    FederatedSection(split="dirichlet", alpha=0.0).check()
    # a distributed run would not read them at all: setting them is refused, by name
    with pytest.raises(ConfigError, match=r"federated\.alpha is set, but federated\.algorithm = 'none'"):
        load(["--split", "dirichlet", "--alpha", "0"])


def test_command_line_errors():
    with pytest.raises(ConfigError, match="epochs: cannot parse"):
        load(["--epochs", "many"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load(["--augment", "maybe"])
    with pytest.raises(ConfigError, match="unknown key 'betta'"):
        load(["--set", "optim.betta=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(["--config", "/nonexistent.toml"])


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr=nan"], "optim.lr must be a finite number, got nan"),
    (["--lr", "inf"], "optim.lr must be a finite number, got inf"),
    (["--set", "optim.beta=nan"], "beta must be a finite number >= 0, got nan"),
])
def test_non_finite_numbers_on_the_command_line_get_the_rule_not_a_parse_error(args, message):
    """The command line reads numbers as a TOML file does, so nan/inf meet the same rule."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(args)


def test_command_line_reads_toml_numbers():
    assert load(["--set", "train.epochs=1_000"])["train"]["epochs"] == 1000


def test_batch_must_split_into_workers_micro_batches_need_not():
    with pytest.raises(ConfigError, match=r"global batch 101 does not split into 2 workers; use a multiple of 2, e.g. 100 or 102"):
        check_batch_split(load(["--batch-size", "101"]), 2)
    check_batch_split(load(["--batch-size", "100", "--micro-batches", "4"]), 2)  # 50 = 13 + 13 + 12 + 12
    with pytest.raises(ConfigError, match=r"local batch 150 .* not a multiple of optim.micro_batch_size = 64"):
        check_batch_split(load(["--batch-size", "300", "--micro-batch-size", "64"]), 2)


def test_lr_scaling_rules():
    assert scaled_learning_rate(0.1, 1024, 128, "linear") == pytest.approx(0.8)
    assert scaled_learning_rate(0.1, 1024, 128, "sqrt") == pytest.approx(0.1 * math.sqrt(8))
    assert scaled_learning_rate(0.1, 1024, 128, "none") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown LR scaling"):
        scaled_learning_rate(0.1, 1024, 128, "cubic")


@pytest.mark.parametrize("schedule, expected", [
    # warmup 0.1 -> 0.8 over 10 steps, then constant
    (WarmupDecay(0.8, 0.1, warmup_steps=10), {0: 0.1, 5: 0.45, 10: 0.8, 99: 0.8}),
    # step decay by 0.1 at steps 20 and 30
    (WarmupDecay(1.0, warmup_steps=0, decay="step", boundaries=[20, 30], decay_factor=0.1),
     {0: 1.0, 19: 1.0, 20: 0.1, 29: 0.1, 30: 0.01}),
    # warmup 4 steps from 0.25 to 1, then cosine to 0 at step 104
    (WarmupDecay(1.0, 0.25, warmup_steps=4, decay="cosine", total_steps=104),
     {2: 0.625, 4: 1.0, 54: 0.5, 104: 0.0, 200: 0.0}),
])
def test_schedules_against_hand_computed_values(schedule, expected):
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


def test_schedule_round_trips():
    s = WarmupDecay(0.8, 0.1, warmup_steps=10, decay="cosine", total_steps=50)
    again = WarmupDecay.from_config(s.get_config())
    assert [float(again(i)) for i in range(0, 60, 7)] == [float(s(i)) for i in range(0, 60, 7)]


@pytest.mark.parametrize("count, size", [(10, 2), (11, 3), (100, 7)])
def test_shards_are_equal_disjoint_and_cover_all_but_the_remainder(count, size):
    parts = [list(data.shard(tf.data.Dataset.range(count), count, r, size)[0].as_numpy_iterator())
             for r in range(size)]
    assert len({len(p) for p in parts}) == 1
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == count - count % size


def _epoch_labels(pipes, epoch):
    return np.concatenate([y for _, y in pipes.train_stream(epoch).take(pipes.steps_per_epoch)
                           .as_numpy_iterator()])


def test_pipelines_equal_steps_reproducible_per_epoch_and_rank():
    kw = dict(global_batch=96, seed=3, train_samples=1000, test_samples=300)
    p0 = data.make_pipelines("fashion_mnist", None, rank=0, size=3, **kw)
    p1 = data.make_pipelines("fashion_mnist", None, rank=1, size=3, **kw)
    assert p0.steps_per_epoch == p1.steps_per_epoch == 1000 // 3 // 32
    e0, e1 = _epoch_labels(p0, 0), _epoch_labels(p0, 1)
    assert not np.array_equal(e0, e1)                        # a new shuffle each epoch
    assert np.array_equal(e1, _epoch_labels(p0, 1))          # ... that can be recomputed
    assert not np.array_equal(e0, _epoch_labels(p1, 0))      # ranks differ
    # Skipping batches resumes mid-epoch exactly.
    direct = list(p0.train_stream(1).take(p0.steps_per_epoch).as_numpy_iterator())
    skipped = list(p0.train_stream(1, 2).take(p0.steps_per_epoch - 2).as_numpy_iterator())
    for (xa, ya), (xb, yb) in zip(direct[2:], skipped):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    x, _ = direct[0]
    assert x.dtype == np.float32 and x.shape == (32, 28, 28, 1) and 0.0 <= x.min() and x.max() <= 1.0


def test_dataset_too_small_for_one_step():
    with pytest.raises(ValueError, match="fewer than one local batch"):
        data.make_pipelines("fashion_mnist", None, rank=0, size=2, global_batch=512, seed=0,
                            train_samples=300)


def test_unknown_and_unprepared_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
        data.get_builder("no_such_set", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not prepared in .*tfds build cifar10"):
        data.get_builder("cifar10", tmp_path)
    with pytest.raises(ValueError, match="needs data_dir"):
        data.get_builder("cifar10", None)


def test_the_embedded_train_split_has_the_size_sweeps_check_against():
    from hvd_gradalign import data

    assert data.dataset_info(data.get_builder(data.EMBEDDED_DATASET)).num_train == data.EMBEDDED_TRAIN_SAMPLES


def test_missing_embedded_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.get_builder("fashion_mnist", tmp_path / "prepared")


def test_tfds_path_with_mock_cifar10_and_augmentation(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path)):
        p = data.make_pipelines("cifar10", str(tmp_path), rank=0, size=2, global_batch=16, seed=0,
                                augment=True, test_samples=0)
        x, y = next(iter(p.train_stream(0)))
        assert p.info.input_shape == (32, 32, 3) and p.info.num_classes == 10
        assert x.shape == (8, 32, 32, 3) and y.shape == (8,)
        plain = data.make_pipelines("cifar10", str(tmp_path), rank=0, size=2, global_batch=16, seed=0,
                                    augment=False, test_samples=0)
        x_plain, y_plain = next(iter(plain.train_stream(0)))
    # augment changes the images a run trains on (same samples, same order), not its clean metrics
    np.testing.assert_array_equal(y, y_plain)
    assert not np.allclose(x, x_plain)
    np.testing.assert_array_equal(next(iter(p.train_eval))[0], next(iter(plain.train_eval))[0])


def _schedule(config, steps_per_epoch):
    """The learning-rate schedule `python -m train` gives the optimizer."""
    from train.run import build_optimizer

    return build_optimizer(config, steps_per_epoch, 1).inner_optimizer._learning_rate


def test_warmup_ramps_from_zero_to_the_peak_the_optimizer_sees(hvd):
    # The unscaled lr is the peak: before, the "warmup" started there and did nothing.
    config = load(["--lr", "0.1", "--lr-scaling", "none", "--warmup-epochs", "2", "--batch-size", "2048",
                   "--micro-batches", "16"])
    s = _schedule(config, 4)
    assert [float(s(i)) for i in (0, 2, 4, 6, 8, 100)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


def test_warmup_from_the_reference_lr_goyal(hvd):
    config = load(["--lr", "0.05", "--lr-scaling", "linear", "--batch-size", "512", "--warmup-epochs", "1",
                   "--warmup-from", "lr"])
    s = _schedule(config, 10)
    assert [float(s(i)) for i in (0, 5, 10, 50)] == pytest.approx([0.05, 0.125, 0.2, 0.2])


def test_no_warmup_starts_at_the_peak(hvd):
    s = _schedule(load(["--lr", "0.05", "--lr-scaling", "linear", "--batch-size", "512"]), 10)
    assert float(s(0)) == pytest.approx(0.2)


def test_a_warmup_that_would_not_ramp_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.warmup_from = 'lr'.*would not ramp up"):
        load(["--lr-scaling", "none", "--warmup-epochs", "5", "--warmup-from", "lr"])
    with pytest.raises(ConfigError, match=r"warmup_from = 'upward'; choose one of"):
        load(["--warmup-from", "upward"])


def test_a_warmup_shorter_than_one_update_is_refused(hvd):
    from train.run import build_optimizer

    with pytest.raises(ConfigError, match=r"warmup_epochs = 0.25 is 0 updates at 1 steps per epoch"):
        build_optimizer(load(["--warmup-epochs", "0.25"]), 1, 1)


def test_a_sweep_refuses_a_warmup_shorter_than_one_update_before_launch(tmp_path):
    """The same rule, where the data's size is known before launch: 1,024 samples at
    batch 512 are 2 updates an epoch, so 0.25 epochs of warmup would be none."""
    from sweeps import spec as sweep_spec

    spec = tmp_path / "w.toml"
    spec.write_text('[sweep]\nname = "w"\nbase_config = "train/configs/fashion_mnist.toml"\n[fixed]\n'
                    'train_samples = 1024\nbatch_size = 512\noptimizer = "sgd"\n[[grid]]\n'
                    'warmup_epochs = [0.25, 0.5]\n')
    with pytest.raises(ConfigError, match=r"warmup_epochs = 0.25 is 0 updates at 2 steps per epoch"):
        sweep_spec.load(spec, tmp_path / "runs")
    spec.write_text(spec.read_text().replace("[0.25, 0.5]", "[0.5]"))
    (point,) = sweep_spec.load(spec, tmp_path / "runs").points
    assert point.config["optim"]["warmup_epochs"] == 0.5


def test_runs_without_warmup_keep_their_names_and_warmup_runs_are_renamed():
    """A run without warmup, or one warming up from lr, computes what it did before
    `warmup_from` existed, so its name stays; one warming up from zero gets a new one."""
    import copy

    from sweeps.spec import point_id
    from train.config import DEFAULTS, run_identity

    config = copy.deepcopy(DEFAULTS)
    before = copy.deepcopy(config)
    del before["optim"]["warmup_from"], before["data"]["subset_seed"]
    assert point_id(config, 1) == point_id(before, 1)
    config["optim"]["warmup_epochs"] = before["optim"]["warmup_epochs"] = 5.0
    assert point_id(config, 1) != point_id(before, 1)
    config["optim"]["warmup_from"] = "lr"  # what a warmup did before, where it ramped
    assert point_id(config, 1) == point_id(before, 1)
    config["data"]["subset_seed"] = 3
    config["data"]["train_samples"] = 100
    assert "subset_seed" in json.dumps(run_identity(config))


def test_subset_seed_needs_train_samples():
    with pytest.raises(ConfigError, match=r"subset_seed draws data\.train_samples .* set data\.train_samples"):
        load(["--subset-seed", "1"])
    with pytest.raises(ConfigError, match=r"data\.subset_seed must be >= 0 .* or -1"):
        load(["--subset-seed", "-2", "--train-samples", "10"])


def _train_eval_images(pipes):
    return np.concatenate([x for x, _ in pipes.train_eval.as_numpy_iterator()])


def test_subset_seed_reads_a_seeded_random_subset_outside_validation():
    # The split's order is the prepared tfds dataset's (tfds shuffles on preparation).
    builder = data.get_builder("fashion_mnist")
    images = next(iter(data._split_range(builder, "train", 0, 60000).batch(60000)))[0].numpy()
    kw = dict(rank=0, size=1, global_batch=100, seed=0, train_samples=500, validation_samples=5000,
              test_samples=100)
    first = _train_eval_images(data.make_pipelines("fashion_mnist", None, **kw))
    a = _train_eval_images(data.make_pipelines("fashion_mnist", None, subset_seed=0, **kw))
    b = _train_eval_images(data.make_pipelines("fashion_mnist", None, subset_seed=1, **kw))

    def indices(xs):  # where each image sits in the train split
        flat = images.reshape(len(images), -1)
        lookup = {row.tobytes(): i for i, row in enumerate(flat)}
        return np.array([lookup[np.round(x.reshape(-1) * 255).astype(np.uint8).tobytes()] for x in xs])

    assert np.array_equal(indices(first), np.arange(500))    # without subset_seed: the first ones

    ia, ib = indices(a), indices(b)
    expected = np.sort(np.random.default_rng(0).choice(55000, 500, replace=False))
    assert np.array_equal(ia, expected)                      # the documented draw, in split order
    assert ia.max() < 55000 and ib.max() < 55000             # never the held-out validation
    assert len(set(ia) & set(ib)) < 50 and ia.max() > 500    # another subset, not the first images
    again = _train_eval_images(data.make_pipelines("fashion_mnist", None, subset_seed=0, **kw))
    assert np.array_equal(a, again)
    # The training stream reads the same subset.
    pipes = data.make_pipelines("fashion_mnist", None, subset_seed=0, **kw)
    streamed = np.concatenate([x for x, _ in pipes.train_stream(0).take(5).as_numpy_iterator()])
    assert set(indices(streamed)) == set(ia)
    # Federated runs read the same subset.
    _, (x, _), _, _ = data.load_arrays("fashion_mnist", None, validation_samples=5000, train_samples=500,
                                       test_samples=100, subset_seed=0)
    assert np.array_equal(x, a)


def test_messages_found_by_a_new_user():
    with pytest.raises(ConfigError, match=r"e\.g\. 4\)?$"):
        check_batch_split(load(["--batch-size", "2"]), 4)                 # not "4 or 4"
    with pytest.raises(ConfigError, match=r"split into 3 workers; use a multiple of 3, e\.g\. 9 or 12"):
        check_batch_split(load(["--batch-size", "10"]), 3)
    with pytest.raises(ConfigError, match=r"/ 1 worker\) is not a multiple of optim\.micro_batch_size = 64; "
                                          r"use a global batch that is a multiple of 64, e\.g\. 64 or 128"):
        check_batch_split(load(["--batch-size", "100", "--micro-batch-size", "64"]), 1)
    assert load(["--set", 'optim.lr_scaling="none"'])["optim"]["lr_scaling"] == "none"
    assert load(["--set", "optim.lr_scaling='sqrt'"])["optim"]["lr_scaling"] == "sqrt"
    assert load(["--lr-scaling", "none"])["optim"]["lr_scaling"] == "none"
    with pytest.raises(ValueError, match=r"unknown dataset 'foo_bar': no tensorflow-datasets builder"):
        data.get_builder("foo_bar")


def test_every_optim_key_reaches_the_optimizer_the_run_builds(hvd):
    """Each [optim] key changes what `python -m train` hands Keras, not only the config."""
    import keras

    import hvd_gradalign as hga
    from train.run import build_optimizer

    def built(*argv):
        return build_optimizer(load(["--batch-size", "1024", *argv]), 10, 1)

    base = built("--optimizer", "sgd", "--lr", "0.1")
    inner = base.inner_optimizer
    assert isinstance(base, hga.GradAlign) and base.beta == 0.0  # log_alignment: β = 0 plus V
    plain = built("--optimizer", "sgd", "--set", "optim.log_alignment=false")
    assert isinstance(plain, hga.DistributedOptimizer) and not isinstance(plain, hga.GradAlign)
    assert inner.momentum == 0.9 and not inner.nesterov and inner.weight_decay is None
    assert inner.global_clipnorm is None
    assert float(inner._learning_rate(0)) == pytest.approx(0.8)  # linear from reference_batch 128
    assert float(built("--lr", "0.1", "--set", "optim.reference_batch=256")
                 .inner_optimizer._learning_rate(0)) == pytest.approx(0.4)
    assert float(built("--lr", "0.1", "--lr-scaling", "sqrt")
                 .inner_optimizer._learning_rate(0)) == pytest.approx(0.1 * math.sqrt(8))
    assert isinstance(built("--inner", "adam").inner_optimizer, keras.optimizers.Adam)
    sgd = built("--set", "optim.momentum=0.5", "--nesterov", "true", "--set", "optim.weight_decay=1e-4",
                "--set", "optim.clipnorm=2.0").inner_optimizer
    assert (sgd.momentum, sgd.nesterov, sgd.weight_decay, sgd.global_clipnorm) == (0.5, True, 1e-4, 2.0)
    ga = built("--optimizer", "gradalign", "--beta", "0.3", "--micro-batches", "8")
    assert (ga.beta, ga.micro_batches) == (0.3, 8)
    assert built("--optimizer", "gradalign", "--set", "optim.micro_batch_size=128").micro_batches == 8
    follows = built("--optimizer", "gradalign", "--lr", "0.1", "--beta", "0.2", "--set", "optim.beta_follows_lr=true")
    assert follows.beta is None and follows.beta_lr_ratio == pytest.approx(0.2 / 0.8)


def test_two_pass_optimizers_and_their_keys_reach_the_step(hvd):
    """optim.optimizer = sam / grad_penalty builds that method with the config's strength,
    scope and micro-batches; each SAM key changes the displacement the step takes."""
    import tensorflow as tf

    import hvd_gradalign as hga
    from train.run import build_optimizer

    def built(*argv):
        return build_optimizer(load(["--batch-size", "1024", *argv]), 10, 1)

    sam = built("--optimizer", "sam", "--set", "optim.rho=0.3", "--set", "optim.micro_batch_size=128")
    assert isinstance(sam, hga.SAM) and (sam.rho, sam.scope, sam.adaptive, sam.micro_batches) == (
        0.3, "micro_batch", False, 8)
    assert float(sam.current_strength()) == 0.3
    glob = built("--optimizer", "sam", "--set", "optim.sam_scope=global", "--set", "optim.sam_adaptive=true")
    assert (glob.scope, glob.adaptive, glob.rho) == ("global", True, 0.05)
    pen = built("--optimizer", "grad_penalty", "--beta", "0.2")
    assert isinstance(pen, hga.GradientPenalty) and not isinstance(pen, hga.GradAlign)
    assert (pen.strength, float(pen.current_strength())) == (0.2, 0.2)
    follows = built("--optimizer", "grad_penalty", "--lr", "0.1", "--beta", "0.2", "--set", "optim.beta_follows_lr=true")
    assert follows.strength is None and follows.strength_lr_ratio == pytest.approx(0.2 / 0.8)
    # What each built optimizer displaces by: g_j = (3, 4) (norm 5), ḡ = (0, 1), x = (1, 1).
    g, g_bar, x = [tf.constant([3.0, 4.0], tf.float64)], [tf.constant([0.0, 1.0], tf.float64)], \
        [tf.constant([1.0, 1.0], tf.float64)]

    def v(opt):
        return opt.displacement(g, g_bar, x, opt.current_strength())[0].numpy().tolist()

    assert v(sam) == pytest.approx([0.3 * 0.6, 0.3 * 0.8])
    assert v(built("--optimizer", "sam", "--set", "optim.rho=0.3", "--set", "optim.sam_scope=global")) == \
        pytest.approx([0.0, 0.3])
    assert v(pen) == pytest.approx([0.6, 0.8])
    assert v(built("--optimizer", "gradalign", "--beta", "0.2")) == pytest.approx([0.6, 0.6])
    adaptive = v(built("--optimizer", "sam", "--set", "optim.rho=0.3", "--set", "optim.sam_adaptive=true"))
    t = 1.01  # |x| + 0.01: equal scales, so ASAM points where SAM does here
    assert adaptive == pytest.approx([0.3 * t * 0.6, 0.3 * t * 0.8])


def test_keys_of_another_optimizer_are_refused():
    """A SAM key (or beta_follows_lr) set for a method that does not read it would do
    nothing: refused with what to change."""
    for argv in (["--optimizer", "gradalign", "--set", "optim.rho=0.2"],
                 ["--optimizer", "sgd", "--set", "optim.sam_scope=global"],
                 ["--optimizer", "grad_penalty", "--set", "optim.sam_adaptive=true"]):
        with pytest.raises(ConfigError, match=r"does nothing with optim.optimizer = .*only sam reads it"):
            load(argv)
    with pytest.raises(ConfigError, match=r"beta_follows_lr = true does nothing with optim.optimizer = 'sam'"):
        load(["--optimizer", "sam", "--set", "optim.beta_follows_lr=true"])
    with pytest.raises(ConfigError, match=r"optim.rho must be a finite number >= 0"):
        load(["--optimizer", "sam", "--set", "optim.rho=-0.1"])
    with pytest.raises(ConfigError, match=r"optim.sam_scope = 'batch'; choose one of"):
        load(["--optimizer", "sam", "--set", "optim.sam_scope=batch"])
    assert load(["--optimizer", "sam", "--set", "optim.rho=0.2"])["optim"]["rho"] == 0.2


def test_only_the_config_module_reads_the_tables_by_key():
    """Everything else reads typed(config).section.key, so a renamed key is an attribute
    error where it is read, not a KeyError in a run hours later."""
    import re

    from tests.conftest import REPO

    lookup = re.compile(r"""\[["'](data|model|optim|train|federated)["']\]""")
    found = [f"{p.relative_to(REPO)}:{i}" for folder in ("train", "sweeps", "benchmarks", "hvd_gradalign")
             for p in sorted((REPO / folder).rglob("*.py")) if p.name not in ("config.py", "schema.py")
             or p.parent.name != "train"
             for i, line in enumerate(p.read_text().splitlines(), 1) if lookup.search(line)]
    assert found == []
