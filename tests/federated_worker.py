"""Run every federated scenario on this Horovod worker; rank 0 saves the weights."""

import sys

import numpy as np

import hvd_gradalign as hga
from tests import federated_scenarios as fs

hga.init(require_horovod=True)
out = {"size": hga.size()}
for name in fs.SCENARIOS:
    state, _ = fs.run(name)
    for i, w in enumerate(state.weights):
        out[f"{name}/w{i}"] = w
np.savez(f"{sys.argv[1]}/rank{hga.rank()}.npz", **out)
