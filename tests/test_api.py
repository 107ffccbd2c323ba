"""Public API behaviour: errors, serialisation, state handling of the second pass."""

import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvd_gradalign as hga
from hvd_gradalign import distributed


def _data(n=64, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, k, size=n)


def _model(d=6, k=3, extra=()):
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(8, activation="relu"), *extra,
                             keras.layers.Dense(k)])


def _compile(model, opt):
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


# ---- errors --------------------------------------------------------------

@pytest.mark.parametrize("beta", [-0.1, float("nan"), float("inf")])
def test_bad_beta_is_rejected(beta):
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        hga.GradAlign(keras.optimizers.SGD(0.1), beta=beta)


def test_beta_and_ratio_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of beta"):
        hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, beta_lr_ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of beta"):
        hga.GradAlign(keras.optimizers.SGD(0.1))


@pytest.mark.parametrize("m", [0, -2, 1.5, True])
def test_bad_micro_batches_is_rejected(m):
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1"):
        hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=m)


def test_loss_scaled_inner_is_rejected():
    with pytest.raises(TypeError, match="LossScaleOptimizer"):
        hga.GradAlign(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), beta=0.1)


def test_base_optimizer_arguments_go_to_inner():
    with pytest.raises(ValueError, match="set it on the inner optimizer"):
        hga.DistributedOptimizer(keras.optimizers.SGD(0.1), clipnorm=1.0)


def test_compile_alone_runs_the_gradalign_step(hvd):
    """compile + fit, no wrap: the same weights as the explicit wrap form, V logged,
    and different from plain SGD (so the GradAlign step really ran)."""
    x, y = _data()
    results = []
    for how in ("compile", "wrap", "sgd"):
        keras.utils.set_random_seed(0)
        model = _model() if how != "wrap" else hga.wrap(_model())
        beta = 0.0 if how == "sgd" else 0.5
        _compile(model, hga.GradAlign(keras.optimizers.SGD(0.1), beta=beta, micro_batches=4))
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        results.append(model.get_weights())
        assert all(v > 0 for v in history.history["grad_variance"])
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(results[0], results[2])) > 1e-4


def test_dispatch_is_installed_in_the_keras_trainer(hvd):
    """What compile-is-enough relies on: keras.Model takes train_step, fit and
    reset_metrics from the TensorFlow trainer class, where the dispatch sits."""
    from hvd_gradalign import trainer

    owner = trainer.trainer_class()
    assert owner.__name__ == "TensorFlowTrainer"
    for name in ("train_step", "fit", "reset_metrics"):
        assert getattr(keras.Model, name) is owner.__dict__[name]
        assert "hvd_gradalign" in owner.__dict__[name].__code__.co_filename


class OwnStepModel(keras.Model):
    """A subclassed model with its own train step."""

    def __init__(self, use_super):
        super().__init__()
        self.use_super = use_super
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        if self.use_super:
            return super().train_step(data)
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x))
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


def test_own_train_step_without_super_fails_at_first_step(hvd):
    x, y = _data()
    model = _compile(OwnStepModel(use_super=False), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1))
    model(x[:1])
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(RuntimeError, match=r"super\(\)\.train_step\(data\).*two_pass_step"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    ok = _compile(OwnStepModel(use_super=True), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1,
                                                          micro_batches=2))
    history = ok.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert history.history["grad_variance"][0] > 0


def test_wrap_takes_effect_on_compiled_fitted_and_loaded_models(hvd, tmp_path):
    x, y = _data()
    model = _compile(_model(), hga.DistributedOptimizer(keras.optimizers.SGD(0.1)))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert model.train_function is not None
    hga.wrap(model)
    assert model.train_function is None  # the next fit builds it again, with the dispatch
    _compile(model, hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4))
    assert "grad_variance" in model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    model.save(tmp_path / "m.keras")
    loaded = hga.wrap(keras.models.load_model(tmp_path / "m.keras"))
    assert "grad_variance" in loaded.fit(x, y, batch_size=16, epochs=1, verbose=0).history


@pytest.mark.parametrize("split", [0.1, 0.2])
def test_validation_split_with_a_partial_last_batch_trains(hvd, split):
    """The Keras docs' fit(x, y, batch_size, validation_split): 64 × (1 − split) samples
    leave a partial last batch, which GradAlign cuts into unequal micro-batches."""
    x, y = _data()
    model = _compile(_model(), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4))
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_split=split)
    assert "val_loss" in history.history and np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def _beta0_equals_data_parallel(fit_input, **fit_kwargs):
    """GradAlign(β=0) on batches of any size trains exactly as data-parallel SGD."""
    keras.utils.set_random_seed(0)
    ga = _compile(_model(), hga.GradAlign(keras.optimizers.SGD(0.1, momentum=0.5), beta=0.0, micro_batches=4))
    keras.utils.set_random_seed(0)
    dp = _compile(_model(), hga.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.5)))
    for model in (ga, dp):
        model.fit(fit_input(), epochs=2, verbose=0, shuffle=False, **fit_kwargs)
    for a, b in zip(ga.get_weights(), dp.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    return ga


def test_local_batch_smaller_than_micro_batches_trains_on_fewer_slices(hvd):
    x, y = _data(n=20)
    _beta0_equals_data_parallel(lambda: x, y=y, batch_size=2)   # 2 slices of 1, not 4


def test_partial_last_batch_trains_as_arrays_and_datasets(hvd):
    x, y = _data(n=60)
    _beta0_equals_data_parallel(lambda: x, y=y, batch_size=16)  # last batch: 12 = 3 + 3 + 3 + 3
    _beta0_equals_data_parallel(lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    _beta0_equals_data_parallel(lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(10, drop_remainder=True))
    model = _compile(_model(), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4))
    history = model.fit(x, y, batch_size=17, epochs=1, verbose=0)    # 17 = 5 + 4 + 4 + 4; last 9
    assert np.isfinite(history.history["loss"]).all() and history.history["grad_variance"][0] > 0


def test_custom_loop_weights_unequal_micro_batches_by_samples(hvd):
    """A linear loss has no curvature, so h = ḡ: the mean over *samples* of the batch.
    6 samples in 4 micro-batches are slices of 2, 2, 1, 1; a mean over slices would
    weight the last two samples twice."""
    w = tf.Variable(tf.ones((3, 1), tf.float64))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float64)])
    def step(x):
        result = hga.gradalign_gradients(lambda mb: (tf.reduce_mean(tf.matmul(mb, w)), mb), [w], x, 4, 0.1)
        return result.gradients[0], result.outputs

    x = np.arange(18, dtype=np.float64).reshape(6, 3) ** 2
    grad, outputs = step(x)
    np.testing.assert_allclose(grad.numpy()[:, 0], x.mean(axis=0), rtol=1e-15)
    np.testing.assert_array_equal(outputs.numpy(), x)  # the first pass's outputs, in order
    with pytest.raises(tf.errors.InvalidArgumentError, match="local batch of 0 samples"):
        step(np.zeros((0, 3)))


def test_missing_horovod_build_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)
    with pytest.raises(distributed.HorovodUnavailableError, match="scripts/setup.sh"):
        distributed._import_horovod()


def test_several_workers_without_horovod_is_an_error(monkeypatch):
    monkeypatch.setattr(distributed, "_initialised", False)
    monkeypatch.setattr(distributed, "_hvd", None)
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    with pytest.raises(distributed.HorovodUnavailableError):
        distributed.init()


# ---- serialisation -------------------------------------------------------

def test_wrapped_gradalign_model_saves_and_loads(hvd, tmp_path):
    x, y = _data()
    opt = hga.GradAlign(keras.optimizers.SGD(0.05, momentum=0.9), beta_lr_ratio=0.5, micro_batches=4)
    model = _compile(hga.wrap(_model()), opt)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert isinstance(loaded.optimizer, hga.GradAlign)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == 4
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Training continues identically from the loaded copy once it is wrapped again.
    hga.wrap(loaded)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_distributed_optimizer_round_trips_with_plain_model(hvd, tmp_path):
    x, y = _data()
    model = _compile(_model(), hga.DistributedOptimizer(keras.optimizers.Adam(1e-3)))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, hga.DistributedOptimizer)
    assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


# ---- the second pass and model state ---------------------------------------

def test_wrap_turns_off_xla(hvd):
    model = hga.wrap(_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compile(model, hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1))
        model.compile(optimizer=hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1), loss="mse",
                      jit_compile=True)
    assert model.jit_compile is False


def test_fit_logs_alignment_metrics(hvd):
    x, y = _data()
    model = _compile(hga.wrap(_model()), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    for key in ("grad_variance", "grad_variance_ratio", "loss", "accuracy"):
        assert len(history.history[key]) == 2
    assert all(v > 0 for v in history.history["grad_variance"])


def test_batchnorm_statistics_come_from_first_pass_only(hvd):
    """Moving statistics after a step equal those of m forward passes at x."""
    x, y = _data(n=32)
    model = hga.wrap(_model(extra=[keras.layers.BatchNormalization(momentum=0.5)]))
    reference = _model(extra=[keras.layers.BatchNormalization(momentum=0.5)])
    reference.set_weights(model.get_weights())
    _compile(model, hga.GradAlign(keras.optimizers.SGD(0.5), beta=1.0, micro_batches=4))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for j in range(4):
        reference(x[8 * j:8 * (j + 1)], training=True)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    bn_ref = [layer for layer in reference.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), bn_ref.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), bn_ref.moving_variance.numpy(), rtol=1e-5, atol=1e-6)


def test_second_pass_reuses_the_dropout_draw(hvd):
    """With a vanishing β the displaced gradients equal the first ones only if
    each micro-batch sees the same dropout mask twice."""
    x, y = _data(n=32)
    model = _model(extra=[keras.layers.Dropout(0.5, seed=1)])
    model(x[:1])
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_fn(mb):
        xb, yb = mb
        pred = model(xb, training=True)
        return loss_obj(yb, pred), pred

    def direction(beta):
        r = hga.gradalign_gradients(loss_fn, model.trainable_variables, (x, y), 4,
                                    tf.constant(beta, tf.float64),
                                    state_variables=model.non_trainable_variables,
                                    skip_second_pass=beta == 0.0)
        return r.gradients  # ḡ when the second pass is skipped

    h = direction(1e-9)
    g_bar = direction(0.0)  # a fresh draw: differs from h's draw
    seeds_before = [np.asarray(v) for v in model.non_trainable_variables]
    h_again = direction(1e-9)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(seeds_before, model.non_trainable_variables))
    # Same step: h ≈ ḡ of the same draw. Recompute ḡ of h_again's draw by restoring the seed.
    for v, s in zip(model.non_trainable_variables, seeds_before):
        v.assign(s)
    g_bar_same = direction(0.0)
    for a, b in zip(h_again, g_bar_same):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(np.asarray(a), np.asarray(b), atol=1e-6) for a, b in zip(h, g_bar))


@pytest.mark.horovod
def test_workers_with_different_step_counts_are_refused_before_training(tmp_path):
    """Shards of 40 and 24 samples at batch 8: 5 steps against 3. Without the check the
    first worker would wait for ever in its fourth allreduce; with it both stop at once.
    Shards of 40 and 36 (5 steps each, the second with a partial last batch) train."""
    from tests.conftest import horovodrun

    horovodrun(2, ["tests/unequal_shards_script.py", tmp_path, "40", "24"], timeout=300)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "different numbers of steps per epoch" in text and "steps_per_epoch" in text, text
    horovodrun(2, ["tests/unequal_shards_script.py", tmp_path, "40", "36"], timeout=300)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["trained", "trained"]


# ---- Keras' fit as users call it: GradAlign(β=0) must train exactly as data-parallel SGD

def test_fit_with_sample_weight(hvd):
    x, y = _data(n=60)
    w = np.random.default_rng(1).random(60).astype("float32")
    _beta0_equals_data_parallel(lambda: x, y=y, sample_weight=w, batch_size=16)


def test_fit_with_class_weight(hvd):
    x, y = _data(n=60)
    _beta0_equals_data_parallel(lambda: x, y=y, class_weight={0: 1.0, 1: 3.0, 2: 0.5}, batch_size=16)


def test_fit_with_validation_data(hvd):
    x, y = _data(n=60)
    model = _beta0_equals_data_parallel(lambda: x[:44], y=y[:44], validation_data=(x[44:], y[44:]), batch_size=16)
    assert "val_loss" in model.history.history


def test_fit_with_a_python_generator_of_uneven_batches(hvd):
    x, y = _data(n=60)

    def batches():  # sizes 16, 16, 16, 12 each epoch
        for start in range(0, 60, 16):
            yield x[start:start + 16], y[start:start + 16]

    _beta0_equals_data_parallel(lambda: _repeat(batches), steps_per_epoch=4)


def _repeat(make):
    while True:
        yield from make()


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch):
        super().__init__()
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return -(-len(self.x) // self.batch)

    def __getitem__(self, i):
        return self.x[i * self.batch:(i + 1) * self.batch], self.y[i * self.batch:(i + 1) * self.batch]


def test_fit_with_a_py_dataset(hvd):
    x, y = _data(n=60)
    _beta0_equals_data_parallel(lambda: _Batches(x, y, 16))


def test_fit_with_steps_per_epoch_on_an_endless_dataset_and_initial_epoch(hvd):
    x, y = _data(n=60)
    endless = lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(12).repeat()
    _beta0_equals_data_parallel(endless, steps_per_epoch=3)
    model = _compile(_model(), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4))
    history = model.fit(endless(), steps_per_epoch=3, epochs=4, initial_epoch=2, verbose=0)
    assert history.epoch == [2, 3] and int(model.optimizer.iterations) == 6


def _example_on_two_workers(script, *args):
    """Run examples/SCRIPT on 2 workers; (stdout, test accuracy), weights equal on both."""
    import re

    from tests.conftest import horovodrun

    out = horovodrun(2, [f"examples/{script}", *args], timeout=600).stdout
    sums = re.findall(r"rank \d weights checksum: (\S+)", out)
    assert len(sums) == 2 and sums[0] == sums[1], out[-3000:]
    return out, float(re.search(r"Test accuracy: ([0-9.]+)", out).group(1))


@pytest.mark.horovod
def test_functional_tf_data_example_on_two_workers():
    out, accuracy = _example_on_two_workers("functional_tf_data.py", "--samples", "2050", "--epochs", "1")
    assert "11/11" in out and accuracy > 0.3, out[-3000:]       # 1,025 a worker: last batch 25


@pytest.mark.horovod
def test_subclassed_train_step_example_on_two_workers():
    out, accuracy = _example_on_two_workers("subclassed_train_step.py", "--samples", "2000", "--epochs", "1")
    assert "grad_variance logged: True" in out and "input_norm" in out and accuracy > 0.3, out[-3000:]


@pytest.mark.horovod
def test_keras_docs_convnet_example_on_two_workers():
    """examples/keras_mnist_convnet.py: the Keras docs' script with only compile (and the
    Horovod lines) changed; 6,000 images leave each worker 2,700 after validation_split,
    so its last batch holds 12 samples (4 micro-batches of 3)."""
    import re

    from tests.conftest import horovodrun

    proc = horovodrun(2, ["examples/keras_mnist_convnet.py", "--samples", "6000"], timeout=600)
    out = proc.stdout
    assert re.search(r"22/22 - .*val_accuracy", out), out[-3000:]
    accuracy = float(re.search(r"Test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.3, out[-3000:]   # chance is 0.1; 22 Adam steps (0.45 after 11 in one run)
    sums = re.findall(r"rank \d weights checksum: (\S+)", out)
    assert len(sums) == 2 and sums[0] == sums[1], out[-3000:]


def test_keras_docs_convnet_example_on_one_worker():
    """The same script with plain python: one worker, 3,000 images, 2,700 after
    validation_split, so again 22 steps whose last holds 12 samples."""
    import re
    import subprocess
    import sys

    from tests.conftest import REPO
    from train.launch import subprocess_env

    proc = subprocess.run([sys.executable, "examples/keras_mnist_convnet.py", "--samples", "3000"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"22/22 - .*val_accuracy", proc.stdout), proc.stdout[-3000:]
    assert float(re.search(r"Test accuracy: ([0-9.]+)", proc.stdout).group(1)) > 0.3, proc.stdout[-3000:]


def test_keras_internals_sit_behind_one_module_with_a_clear_error():
    import re
    from pathlib import Path

    from hvd_gradalign import keras_internals

    library = Path(hga.__file__).parent
    private = re.compile(r"\._(compute_loss|call_has_training_arg|loss_tracker)\b")
    users = sorted(p.name for p in library.glob("*.py") if private.search(p.read_text()))
    assert users == ["keras_internals.py"]
    assert keras_internals.trainer_class() in keras.Model.__mro__
    with pytest.raises(keras_internals.KerasInternalsError,
                       match=rf"this Keras \({re.escape(keras.__version__)}\) has no Layer\._call_has_training_arg"):
        keras_internals.call_has_training_arg(object())
    with pytest.raises(keras_internals.KerasInternalsError, match=r"_loss_tracker \(is the model compiled\?\)"):
        keras_internals.loss_tracker(object())


def test_a_failed_fit_leaves_the_model_trainable(hvd):
    """A GradAlign fit that fails inside the step (wrong input width) must not break the
    next fit, as it does not in plain Keras."""
    x, y = _data()
    model = _compile(_model(), hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, micro_batches=4))
    with pytest.raises(ValueError):
        model.fit(np.ones((64, 7), "float32"), y, batch_size=16, verbose=0)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and "grad_variance" in history.history
