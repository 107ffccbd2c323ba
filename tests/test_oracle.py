"""The library against the float64 NumPy oracle, on 1 and 2 workers."""

import numpy as np
import pytest

from tests import scenarios
from tests.conftest import horovodrun

GA_SCENARIOS = scenarios.TWO_PASS  # GradAlign, SAM (per micro-batch, global, adaptive), the penalty


@pytest.fixture(scope="module")
def one_worker(hvd):
    return {name: scenarios.run(name, rank=0, size=1) for name in scenarios.SCENARIOS}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_workers")
    horovodrun(2, ["tests/hvd_worker.py", out])
    return [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]


def weights_of(result, name):
    return [result[f"{name}/w{i}"] for i in range(sum(k.startswith(f"{name}/w") for k in result))]


def assert_weights_close(actual, expected, atol=1e-8):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


@pytest.mark.parametrize("name", GA_SCENARIOS)
def test_one_worker_m4_matches_oracle(one_worker, name):
    expected, _ = scenarios.oracle(name)
    assert_weights_close(one_worker[name][0], expected)


@pytest.mark.horovod
@pytest.mark.parametrize("name", GA_SCENARIOS)
def test_two_workers_m2_match_oracle(two_workers, name):
    assert int(two_workers[0]["size"]) == 2
    expected, _ = scenarios.oracle(name)
    for rank in (0, 1):
        assert_weights_close(weights_of(two_workers[rank], name), expected)


@pytest.mark.horovod
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_two_workers_equal_one_worker(one_worker, two_workers, name):
    """W=2 × m=2 equals W=1 × m=4 (and the data-parallel step, W=2 equals W=1)."""
    assert_weights_close(weights_of(two_workers[0], name), one_worker[name][0], atol=1e-10)


def test_oracle_is_not_trivially_satisfied():
    """The GradAlign displacement changes the result: β>0 differs from β=0."""
    with_beta, _ = scenarios.oracle("ga_mlp_sgd")
    without, _ = scenarios.oracle("dp_mlp")
    assert max(np.abs(a - b).max() for a, b in zip(with_beta, without)) > 1e-4


def test_beta0_equals_distributed_optimizer_one_worker(one_worker):
    for a, b in zip(one_worker["ga_beta0_mlp"][0], one_worker["dp_mlp"][0]):
        np.testing.assert_array_equal(a, b)
    assert_weights_close(one_worker["dp_mlp"][0], scenarios.oracle("dp_mlp")[0])


@pytest.mark.horovod
def test_beta0_equals_distributed_optimizer_two_workers(two_workers):
    for rank in (0, 1):
        for a, b in zip(weights_of(two_workers[rank], "ga_beta0_mlp"), weights_of(two_workers[rank], "dp_mlp")):
            np.testing.assert_array_equal(a, b)
    assert_weights_close(weights_of(two_workers[0], "dp_mlp"), scenarios.oracle("dp_mlp")[0])


@pytest.mark.parametrize("name", ["tp_sam_rho0_mlp", "tp_penalty0_mlp"])
def test_strength0_equals_distributed_optimizer_one_worker(one_worker, name):
    """ρ = 0 (SAM) and strength 0 (the penalty) are exactly data-parallel SGD."""
    for a, b in zip(one_worker[name][0], one_worker["dp_mlp"][0]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.horovod
@pytest.mark.parametrize("name", ["tp_sam_rho0_mlp", "tp_penalty0_mlp"])
def test_strength0_equals_distributed_optimizer_two_workers(two_workers, name):
    for rank in (0, 1):
        for a, b in zip(weights_of(two_workers[rank], name), weights_of(two_workers[rank], "dp_mlp")):
            np.testing.assert_array_equal(a, b)


def test_two_pass_methods_differ_from_each_other_and_from_sgd():
    """Each displacement changes the result, and differently: an oracle test of one
    method cannot pass with another method's rule."""
    from tests import oracle as ref

    x, y = scenarios.data()
    params = scenarios.initial_params("mlp")
    mbs = [(x[j * 8:(j + 1) * 8], y[j * 8:(j + 1) * 8]) for j in range(4)]
    h = {m: ref.two_pass_direction(ref.mlp_grad, params, mbs, 0.5, m)[0] for m in ref.DISPLACEMENTS}
    h["sgd"] = ref.two_pass_direction(ref.mlp_grad, params, mbs, 0.0)[0]
    names = sorted(h)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert max(np.abs(u - v).max() for u, v in zip(h[a], h[b])) > 1e-4, (a, b)


def test_logged_variance_matches_oracle_one_worker(one_worker):
    _, variances = scenarios.oracle("ga_mlp_sgd")
    history = one_worker["ga_mlp_sgd"][1]
    np.testing.assert_allclose(history["grad_variance"][-1], np.mean(variances), rtol=1e-6)


@pytest.mark.horovod
def test_logged_variance_matches_oracle_two_workers(two_workers):
    _, variances = scenarios.oracle("ga_mlp_sgd")
    for rank in (0, 1):
        logged = two_workers[rank]["ga_mlp_sgd/history/grad_variance"][-1]
        np.testing.assert_allclose(logged, np.mean(variances), rtol=1e-6)


@pytest.mark.horovod
def test_metric_average_makes_ranks_agree(two_workers):
    """Each rank's local loss differs; MetricAverage reports the global mean on all ranks."""
    losses = [two_workers[r]["ga_mlp_sgd/history/loss"][-1] for r in (0, 1)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# Any batch fit gives GradAlign: micro-batches of unequal size, workers with unequal batches.

def test_micro_batch_sizes_differ_by_at_most_one():
    from hvd_gradalign.steps import micro_batch_sizes

    assert micro_batch_sizes(120, 4) == [30] * 4
    assert micro_batch_sizes(8, 3) == [3, 3, 2]
    assert micro_batch_sizes(2, 3) == [1, 1]
    for n in range(1, 40):
        for m in range(1, 9):
            sizes = micro_batch_sizes(n, m)
            assert sum(sizes) == n and len(sizes) == min(m, n) and max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def uneven_one_worker(hvd):
    return {name: scenarios.run_uneven(name, rank=0, size=1) for name in scenarios.UNEVEN}


@pytest.mark.parametrize("name", list(scenarios.UNEVEN))
def test_uneven_micro_batches_one_worker_match_oracle(uneven_one_worker, name):
    weights, history = uneven_one_worker[name]
    expected, variances = scenarios.oracle_uneven(name, 1)
    assert_weights_close(weights, expected, atol=1e-12)
    np.testing.assert_allclose(history["grad_variance"][-1], np.mean(variances), rtol=1e-6)


@pytest.mark.horovod
@pytest.mark.parametrize("name", list(scenarios.UNEVEN))
def test_uneven_batches_two_workers_match_oracle(two_workers, name):
    expected, variances = scenarios.oracle_uneven(name, 2)
    for rank in (0, 1):
        assert_weights_close(weights_of(two_workers[rank], name), expected, atol=1e-12)
        np.testing.assert_allclose(two_workers[rank][f"{name}/history/grad_variance"][-1], np.mean(variances),
                                   rtol=1e-6)


def test_uneven_oracle_weights_by_samples():
    """β = 0 on unequal slices is plain mini-batch SGD on the union of the workers'
    batches; weighting the slices equally instead would not be."""
    from tests import oracle as ref

    for size in (1, 2):
        params, _ = scenarios.oracle_uneven("uneven_beta0", size)
        local = [scenarios.uneven_local(r, size) for r in range(size)]
        b, plain, opt = scenarios.UNEVEN_BATCH, scenarios.initial_params("mlp"), ref.SGD(0.25, 0.5)
        for t in range(-(-scenarios.UNEVEN_SAMPLES[size][0] // b)):
            xs = np.concatenate([x[t * b:(t + 1) * b] for x, _ in local]).astype(np.float32).astype(np.float64)
            ys = np.concatenate([y[t * b:(t + 1) * b] for _, y in local])
            plain = opt.step(plain, ref.mlp_grad(plain, xs, ys)[1])
        assert_weights_close(params, plain, atol=1e-12)
    with_beta, _ = scenarios.oracle_uneven("uneven_ga", 2)
    assert max(np.abs(a - b).max() for a, b in zip(with_beta, params)) > 1e-4
