"""The federated algorithms, one strategy per module (in the manner of Flower's
``Strategy``): how a participant starts, what its local steps add to the gradient, what
it reports, how the server averages, and what a round costs. The round loop
(``hvd_gradalign.federated.FederatedTrainer``) calls these hooks and knows no names.

A strategy does its arithmetic with the operators of the arrays it is handed and asks
the trainer for everything else (weighted means over all workers, gradients, row
gathers), so this package imports no TensorFlow and the config and the reports read the
algorithms' names and costs from it. A new algorithm is a new module here that defines
``STRATEGY``; it is found by its module's presence.
"""

from __future__ import annotations

import importlib
import pkgutil

from .fedavg import FedAvg, RoundCost  # noqa: F401 (the base every strategy extends)


def _discover() -> dict:
    found = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        strategy = getattr(importlib.import_module(f"{__name__}.{module}"), "STRATEGY", None)
        if strategy is not None:
            found[strategy.name] = strategy
    return found


STRATEGIES = _discover()
