"""A callback that stops one worker stops them all after the same step (no hang)."""

import json

import numpy as np
import pytest

from tests.conftest import horovodrun


@pytest.mark.horovod
@pytest.mark.parametrize("case, optimizer, batches, line", [
    ("nan", "gradalign", 3, "stopping all 2 workers after epoch 1, batch 3: worker 1: its loss is not finite"),
    ("callback", "distributed", 2, "stopping all 2 workers after epoch 1, batch 2: worker 0: a callback set "
                                   "model.stop_training"),
    ("none", "gradalign", 8, None),
])
def test_a_worker_that_stops_alone_stops_every_worker(tmp_path, case, optimizer, batches, line):
    """Stock TerminateOnNaN with a NaN on worker 1 only, and a user callback that stops
    worker 0 only: both workers end fit after the same batch, within the timeout (before,
    the other worker waited in its next allreduce for ever), and rank 0 says who and why."""
    proc = horovodrun(2, ["tests/collective_stop_script.py", case, tmp_path, optimizer], timeout=300)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["batches"] for r in records] == [batches, batches]
    if line:
        assert line in proc.stdout
    else:
        assert "stopping all" not in proc.stdout
        # Each worker's BatchNorm saw its own data; hga.callbacks() leaves them the mean.
        (before0, after0), (before1, after1) = (r["moving_mean"] for r in records)
        assert max(abs(a - b) for a, b in zip(before0, before1)) > 1e-3
        np.testing.assert_allclose(after0, after1, rtol=0, atol=1e-7)
        np.testing.assert_allclose(after0, (np.array(before0) + np.array(before1)) / 2, rtol=0, atol=1e-6)
