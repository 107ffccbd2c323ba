"""Run every scenario on this Horovod worker and save the results (one file per rank).

    horovodrun -np 2 -H localhost:2 --gloo python tests/hvd_worker.py OUT_DIR
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import hvd_gradalign as hga  # noqa: E402
from tests import scenarios  # noqa: E402


def main(out_dir):
    hga.init(require_horovod=True)
    results = {"size": np.array(hga.size())}
    for name in scenarios.SCENARIOS:
        weights, history = scenarios.run(name, hga.rank(), hga.size())
        for i, w in enumerate(weights):
            results[f"{name}/w{i}"] = w
        for key, values in history.items():
            results[f"{name}/history/{key}"] = np.asarray(values)
    for name in scenarios.UNEVEN:
        weights, history = scenarios.run_uneven(name, hga.rank(), hga.size())
        for i, w in enumerate(weights):
            results[f"{name}/w{i}"] = w
        results[f"{name}/history/grad_variance"] = np.asarray(history["grad_variance"])
    np.savez(os.path.join(out_dir, f"rank{hga.rank()}.npz"), **results)


if __name__ == "__main__":
    main(sys.argv[1])
