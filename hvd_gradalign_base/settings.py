"""The names and rules of the library's settings, without TensorFlow: the library's
own classes check their arguments with these, and the training config and the sweeps
validate a run before launch with the same functions (each rule lives here once).
"""

from __future__ import annotations

import math

# The dataset that ships with the project (hvd_gradalign.data prepares it from local files)
# and the size of its train split, so that a sweep over it is checked without TensorFlow.
EMBEDDED_DATASET = "fashion_mnist"
EMBEDDED_TRAIN_SAMPLES = 60_000

# Model builders by name (hvd_gradalign.models.MODELS has one for each; a test checks).
MODEL_NAMES = ("mlp", "cnn2", "lenet", "resnet20", "wrn16_4")
NORMS = ("batch", "group", "none")
INNER_OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
SAM_SCOPES = ("micro_batch", "global")
SCALING_RULES = ("linear", "sqrt", "none")
DECAYS = ("constant", "step", "cosine")
# Where a warmup starts: "zero" (the usual meaning) or "lr", the learning rate tuned at the
# reference batch (Goyal et al. 2017: from the small-batch rate to the scaled peak).
WARMUP_STARTS = ("zero", "lr")


def warmup_start(warmup_from: str, base_lr: float, peak_lr: float) -> float:
    """The learning rate a warmup starts from; refuses a warmup that would not ramp."""
    if warmup_from not in WARMUP_STARTS:
        raise ValueError(f"unknown warmup start {warmup_from!r}; choose one of {WARMUP_STARTS}")
    if warmup_from == "zero":
        return 0.0
    if base_lr >= peak_lr:
        raise ValueError(
            f"a warmup from the base lr {base_lr:g} to the peak lr {peak_lr:g} would not ramp up "
            f"(the peak is the base lr scaled to the global batch, and here it is not larger: "
            f"lr_scaling 'none', or a batch at or below reference_batch); warm up from zero "
            f"(optim.warmup_from = 'zero') or set optim.warmup_epochs = 0")
    return base_lr


def scaled_learning_rate(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The peak learning rate for ``global_batch`` from ``base_lr`` tuned at ``reference_batch``."""
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}; choose one of {SCALING_RULES}")
    k = global_batch / reference_batch
    return base_lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]


def check_alignment_strength(name, value) -> float:
    """The rule on GradAlign's and FedGA's β (and β's ratio to the lr), in one place:
    the optimizers, the federated rounds and the training config all call it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}. A negative value "
            "displaces micro-batches the wrong way (for GradAlign it pushes their gradients apart)."
        )
    return float(value)


def check_micro_batches(value) -> int:
    """The rule on the number of micro-batches per worker: the two-pass optimizers and
    the training config both call it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {value!r}.")
    return value


def check_learning_rate(name, value) -> float:
    """The rule on a learning rate (the training config's, a federated client's or server's)."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_weight_decay(name, value) -> float:
    """The rule on a weight decay (the inner optimizer's, a federated client's)."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
