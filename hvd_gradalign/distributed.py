"""The one module that talks to Horovod.

Everything else in the library asks this module for the worker's rank and size
and for collective operations. Without ``horovodrun`` (or ``srun``) the library
runs as a single worker and the collectives are identities, so that the same
code is usable and testable in one process.
"""

from __future__ import annotations

import os

import tensorflow as tf

from . import srun_bootstrap

_hvd = None  # horovod.tensorflow once init() found a working build
_initialised = False

# Variables set by the launchers that start several workers; if one of them
# says "more than one worker", a missing Horovod must be an error rather than a
# silent fallback to N independent single-process runs.
_LAUNCHER_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


class HorovodUnavailableError(RuntimeError):
    pass


def _import_horovod():
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise HorovodUnavailableError(
            "Horovod is not installed with TensorFlow support "
            f"({err}). Run scripts/setup.sh, which builds horovod 0.28.1 with "
            "HOROVOD_WITH_TENSORFLOW=1 and Gloo against the installed TensorFlow."
        ) from err
    return hvd


def _launched_with_several_workers() -> bool:
    for name in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 1:
            # SLURM_NTASKS is set for every step of an allocation; only a task
            # started by srun (SLURM_STEP_ID set) is one of several workers.
            if name == "SLURM_NTASKS" and "SLURM_STEP_ID" not in os.environ:
                continue
            return True
    return False


def init(require_horovod: bool | None = None) -> None:
    """Initialise Horovod if it is usable; otherwise run as one worker.

    ``require_horovod=None`` (default) requires Horovod only when a launcher
    started several workers; ``True`` always requires it.
    """
    global _hvd, _initialised
    if _initialised:
        return
    if require_horovod is None:
        require_horovod = _launched_with_several_workers()
    try:
        hvd = _import_horovod()
    except HorovodUnavailableError:
        if require_horovod:
            raise
        hvd = None
    if hvd is not None:
        published = srun_bootstrap.bootstrap_gloo() if srun_bootstrap.started_by_srun() else None
        hvd.init()
        if published is not None and hvd.rank() == 0:
            # Every task has connected once init returns: the address is spent.
            published.unlink(missing_ok=True)
        _pin_gpu(hvd.local_rank())
    _hvd = hvd
    _initialised = True


def _pin_gpu(local_rank: int) -> None:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    try:
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        tf.config.experimental.set_memory_growth(gpus[local_rank % len(gpus)], True)
    except RuntimeError:
        # Devices were already initialised by the caller; respect their choice.
        pass


def _ensure_init() -> None:
    if not _initialised:
        init()


def is_horovod_active() -> bool:
    """Whether this process runs under Horovod (``horovodrun`` or ``srun``), after ``init``."""
    _ensure_init()
    return _hvd is not None


def rank() -> int:
    """This worker's index among all workers, 0 to ``size() - 1`` (0 without Horovod)."""
    _ensure_init()
    return _hvd.rank() if _hvd is not None else 0


def size() -> int:
    """The number of workers (1 without Horovod)."""
    _ensure_init()
    return _hvd.size() if _hvd is not None else 1


def local_rank() -> int:
    """This worker's index among the workers on its node (the GPU it is pinned to)."""
    _ensure_init()
    return _hvd.local_rank() if _hvd is not None else 0


def local_size() -> int:
    """The number of workers on this worker's node."""
    _ensure_init()
    return _hvd.local_size() if _hvd is not None else 1


def _in_xla_context() -> bool:
    from tensorflow.python.ops import control_flow_util

    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _check_not_xla() -> None:
    if _in_xla_context():
        raise RuntimeError(
            "Horovod's collective ops cannot run inside XLA-compiled code. "
            "Compile the model with jit_compile=False (fit does this for a model "
            "compiled with a hvd_gradalign optimizer)."
        )


def allreduce_mean(tensors):
    """Average a list of tensors over all workers with one fused allreduce.

    ``None`` entries (variables without a gradient) stay ``None``.
    """
    return allreduce_list(tensors)


def allreduce_list(tensors, op: str = "average", predivide: float = 1.0, fp16: bool = False):
    """Reduce a list of tensors over all workers with one fused allreduce.

    ``op``: "average" or "sum". ``predivide`` (average only): divide by it before
    the sum and by size/predivide after (Horovod's gradient_predivide_factor; the
    same average, other rounding). ``fp16``: float tensors travel as float16 and
    come back in their own dtype. ``None`` entries stay ``None``.
    """
    tensors = [None if t is None else tf.convert_to_tensor(t) for t in tensors]
    if op not in ("average", "sum"):
        raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
    present = [i for i, t in enumerate(tensors) if t is not None]
    sent = [tensors[i] for i in present]
    if fp16:  # also on one worker: the same rounding as on several
        sent = [tf.cast(t, tf.float16) if t.dtype.is_floating else t for t in sent]
    if size() == 1:
        reduced = sent
    else:
        _check_not_xla()
        if op == "sum":
            reduced = _hvd.grouped_allreduce(sent, op=_hvd.Sum)
        elif predivide == 1.0:
            reduced = _hvd.grouped_allreduce(sent, op=_hvd.Average)
        else:
            reduced = _hvd.grouped_allreduce(sent, op=_hvd.Sum, prescale_factor=1.0 / predivide,
                                             postscale_factor=predivide / size())
    out = list(tensors)
    for i, r in zip(present, reduced):
        out[i] = tf.cast(r, tensors[i].dtype)
    return out


def allgather(tensor, name=None):
    """Concatenate every worker's ``tensor`` along the first axis (rank order)."""
    tensor = tf.convert_to_tensor(tensor)
    if size() == 1:
        return tensor
    return _hvd.allgather(tensor, name=name)


def broadcast(tensor, root_rank: int = 0, name=None):
    """Root's value of ``tensor`` on every worker."""
    tensor = tf.convert_to_tensor(tensor)
    if size() == 1:
        return tensor
    return _hvd.broadcast(tensor, root_rank, name=name)


def shutdown() -> None:
    global _initialised, _hvd
    if _hvd is not None:
        _hvd.shutdown()
    _hvd, _initialised = None, False


def is_initialized() -> bool:
    return _initialised


def allreduce_mean_numpy(values):
    """Average a list of Python floats over all workers (eagerly)."""
    values = [float(v) for v in values]
    if size() == 1 or not values:
        return values
    reduced = _hvd.allreduce(tf.constant(values, tf.float64), op=_hvd.Average,
                             name="hvd_gradalign.allreduce_mean_numpy")
    return [float(v) for v in reduced.numpy()]


def broadcast_values(values, root_rank: int = 0):
    """Return root's values of a list of tensors (eagerly or in a graph).

    Tensors are packed into one flat buffer per dtype so that any number of
    variables costs one broadcast per dtype.
    """
    values = [tf.convert_to_tensor(v) for v in values]
    if size() == 1 or not values:
        return values
    _check_not_xla()
    out = [None] * len(values)
    by_dtype: dict = {}
    for i, v in enumerate(values):
        by_dtype.setdefault(v.dtype, []).append(i)
    for dtype, idx in sorted(by_dtype.items(), key=lambda kv: kv[0].name):
        flat = tf.concat([tf.reshape(values[i], [-1]) for i in idx], axis=0)
        flat = _hvd.broadcast(flat, root_rank, name=f"hvd_gradalign.broadcast.{dtype.name}")
        sizes = [values[i].shape.num_elements() for i in idx]
        for i, part in zip(idx, tf.split(flat, sizes)):
            out[i] = tf.reshape(part, tf.shape(values[i]))
    return out


def broadcast_variables(variables, root_rank: int = 0) -> None:
    """Overwrite every worker's variables with root's values."""
    variables = list(variables)
    for var, value in zip(variables, broadcast_values([tf.convert_to_tensor(v) for v in variables], root_rank)):
        var.assign(value)



def barrier() -> None:
    """Return once every worker got here (a tiny allreduce)."""
    allreduce_mean_numpy([0.0])
