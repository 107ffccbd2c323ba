"""The Keras internals that make ``compile(optimizer=GradAlign(...))`` enough, behind
one door: the trainer class whose ``train_step``/``fit``/``reset_metrics`` the dispatch
replaces, and three private members of a model that Keras' own ``train_step`` uses.

A Keras release that renames any of them breaks here, at import or at the first step,
with an error that names the Keras version and the missing piece, not somewhere inside
the training step.
"""

from __future__ import annotations

import keras

TESTED = "3.x (tested with the version scripts/constraints.txt pins)"


class KerasInternalsError(RuntimeError):
    pass


def _missing(what: str) -> KerasInternalsError:
    return KerasInternalsError(
        f"hvd_gradalign: this Keras ({keras.__version__}) has no {what}, which the GradAlign "
        f"train step needs (written against Keras {TESTED}). Install the Keras version in "
        f"scripts/constraints.txt, or use hvd_gradalign.gradalign_step in a custom training loop.")


def trainer_class():
    """The class in ``keras.Model``'s MRO that defines ``train_step`` (the TensorFlow
    backend's trainer); ``fit``, ``reset_metrics`` and ``make_train_function`` must be
    found from there too."""
    owner = next((c for c in keras.Model.__mro__ if "train_step" in c.__dict__), None)
    if owner is None:
        raise _missing("train_step on keras.Model's classes")
    for name in ("fit", "reset_metrics", "make_train_function", "_compute_loss"):
        if not any(name in c.__dict__ for c in owner.__mro__):
            raise _missing(f"{name} on {owner.__name__}")
    return owner


def compute_loss(model):
    """The loss function Keras' own train_step calls (``_compute_loss`` tracks the loss
    for metrics and applies the layers' losses; ``compute_loss`` is the public hook a
    user may override, which ``_compute_loss`` calls)."""
    return getattr(model, "_compute_loss", model.compute_loss)


def call_has_training_arg(model) -> bool:
    """Whether ``model.call`` takes ``training`` (Keras decides it once per layer)."""
    try:
        return model._call_has_training_arg
    except AttributeError:
        raise _missing("Layer._call_has_training_arg") from None


def loss_tracker(model):
    """The Mean that Keras' ``fit`` reports as ``loss``."""
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:
        raise _missing("Trainer._loss_tracker (is the model compiled?)")
    return tracker
