"""hvd_gradalign.keras: Horovod's Keras API on Keras 3 (issue: one import line)."""

import keras
import numpy as np
import pytest

import hvd_gradalign as hga
import hvd_gradalign.keras as hvdk
from tests.conftest import horovodrun


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])


def _fit(opt, x, y, batch_size, epochs=1):
    model = _model()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return model


def _close(a, b, **tol):
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(u, v, **tol)


@pytest.mark.parametrize("average", [True, False])
def test_backward_passes_per_step_is_one_step_on_n_times_the_batch(hvd, average):
    x, y = _data()
    accumulated = _fit(hvd_keras_opt(0.1, backward_passes_per_step=4, average_aggregated_gradients=average),
                       x, y, batch_size=16)
    # Horovod sums the N gradients unless average_aggregated_gradients: N × the step.
    lr = 0.1 if average else 0.4
    big = _fit(hvd_keras_opt(lr), x, y, batch_size=64)
    _close(accumulated, big, rtol=1e-5, atol=1e-6)
    assert int(accumulated.optimizer.iterations) == 1  # one update for 4 backward passes
    unaccumulated = _fit(hvd_keras_opt(0.1), x, y, batch_size=16)
    assert max(np.abs(a - b).max() for a, b in zip(unaccumulated.get_weights(), big.get_weights())) > 1e-4


def hvd_keras_opt(lr, **kwargs):
    return hvdk.DistributedOptimizer(keras.optimizers.SGD(lr), **kwargs)


def test_fp16_compression_is_within_fp16_rounding(hvd):
    x, y = _data()
    plain = _fit(hvd_keras_opt(0.1), x, y, batch_size=16)
    fp16 = _fit(hvd_keras_opt(0.1, compression=hvdk.Compression.fp16), x, y, batch_size=16)
    _close(plain, fp16, rtol=0, atol=2e-3)
    assert max(np.abs(a - b).max() for a, b in zip(plain.get_weights(), fp16.get_weights())) > 0


def test_load_model_restores_the_distributed_optimizer_and_resumes(hvd, tmp_path):
    x, y = _data()
    model = _fit(hvdk.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), x, y, batch_size=16)
    model.save(tmp_path / "m.keras")
    loaded = hvdk.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, hga.DistributedOptimizer)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _close(model, loaded, rtol=1e-6, atol=1e-7)
    # A model saved with a plain optimizer comes back distributed too.
    plain = _model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    plain.save(tmp_path / "p.keras")
    assert isinstance(hvdk.load_model(tmp_path / "p.keras").optimizer, hga.DistributedOptimizer)


@pytest.mark.parametrize("kwargs, name", [
    ({"op": hvdk.Adasum}, "op='adasum'"), ({"device_dense": "/gpu:0"}, "device_dense"),
    ({"num_groups": 2}, "num_groups"), ({"process_set": object()}, "process_set"),
])
def test_arguments_that_cannot_be_honoured_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        hvdk.DistributedOptimizer(keras.optimizers.SGD(0.1), **kwargs)


def test_gradalign_is_one_more_name_and_passes_through():
    opt = hvdk.GradAlign(keras.optimizers.SGD(0.1), beta=0.05, micro_batches=2)
    assert hvdk.DistributedOptimizer(opt) is opt
    with pytest.raises(ValueError, match="set it on the inner optimizer|unexpected"):
        hga.GradAlign(keras.optimizers.SGD(0.1), beta=0.1, compression="fp16")


def test_distributed_optimizer_options_round_trip():
    opt = hvd_keras_opt(0.1, backward_passes_per_step=3, compression=hvdk.Compression.fp16, op=hvdk.Sum)
    again = hga.DistributedOptimizer.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()


def test_warmup_callback_follows_horovods_formula(hvd):
    """On N workers: lr = initial/N · (epoch·(N−1)/warmup + 1) per batch, initial after."""
    x, y = _data()
    model = _model()
    model.compile(optimizer=hvd_keras_opt(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(float(model.optimizer.learning_rate)))
    warmup = hvdk.callbacks.LearningRateWarmupCallback(0.1, warmup_epochs=2, momentum_correction=False)
    warmup_size = 4  # as if on 4 workers
    warmup.multiplier = lambda e: 1.0 / warmup_size * (e * (warmup_size - 1) / 2 + 1)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[warmup, record])
    expected = [0.1 / 4 * ((b / 4) * 3 / 2 + 1) for b in range(8)] + [0.1] * 4
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


@pytest.mark.horovod
@pytest.mark.parametrize("model_kind, optimizer, warmup, compression", [
    ("sequential", "sgd", "warmup", "none"),     # lazily built, as Horovod's example is
    ("functional", "adam", "nowarmup", "fp16"),
    ("subclassed", "sgd", "nowarmup", "none"),
])
def test_horovod_style_script_on_two_workers(tmp_path, model_kind, optimizer, warmup, compression):
    horovodrun(2, ["tests/horovod_style_script.py", tmp_path, model_kind, optimizer, warmup, compression])
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    assert int(ranks[0]["size"]) == 2
    weights = [[r[k] for k in r.files if k.startswith("arr_")] for r in ranks]
    assert len(weights[0]) > 0
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)  # workers started from root's weights and stayed equal
    if warmup == "warmup":
        # 4 steps/epoch, warmup 2 epochs on 2 workers: 0.02/2·(0.75/2 + 1) after epoch 1, 0.02 after.
        np.testing.assert_allclose(ranks[0]["lr"], [0.01375, 0.02, 0.02], rtol=1e-6)
    assert (tmp_path / "checkpoint.keras").exists()
    if model_kind != "subclassed":  # its class lives in the script: it would need custom_objects
        resumed = hvdk.load_model(tmp_path / "checkpoint.keras")
        assert isinstance(resumed.optimizer, hga.DistributedOptimizer)


def test_collectives_on_one_worker(hvd):
    np.testing.assert_allclose(hvdk.allreduce(np.array([1.0, 2.0])), [1.0, 2.0])
    np.testing.assert_allclose(hvdk.allreduce(np.array([1.0, 2.0]), op=hvdk.Sum, postscale_factor=2.0), [2.0, 4.0])
    np.testing.assert_allclose(np.asarray(hvdk.allgather(np.ones((2, 3)))), np.ones((2, 3)))
    np.testing.assert_allclose(np.asarray(hvdk.broadcast(np.arange(3.0), 0)), np.arange(3.0))
    assert hvdk.size() == 1 and hvdk.rank() == 0 and hvdk.is_initialized()
    with pytest.raises(ValueError, match="op='adasum'"):
        hvdk.allreduce(np.ones(2), op=hvdk.Adasum)
