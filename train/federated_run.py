"""``python -m train`` with ``federated.algorithm`` set: rounds of virtual clients.

The run directory is the same as for distributed training: config.json,
metrics.csv/json (one row per round), summary.json and checkpoints. A checkpoint
holds the global state and, per worker, its clients' SCAFFOLD control variates
(``state-rank{R}.npz``); it is written every ``checkpoint_every`` rounds, at the
end and on SIGTERM/SIGUSR1/SIGINT, and a re-run resumes from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hvd_gradalign import checkpoint
from train.config import typed
from train.exit_codes import EXIT_INTERRUPTED, EXIT_OK



def _split(config, labels, seed):
    from hvd_gradalign import federated

    f = typed(config).federated
    if f.split == "iid":
        return federated.split_iid(labels, f.clients, seed)
    if f.split == "shards":
        return federated.split_label_shards(labels, f.clients, seed, f.iid_fraction,
                                            f.shards_per_client)
    return federated.split_dirichlet(labels, f.clients, seed, f.alpha)


def _save(run_dir: Path, state, rank: int, history: list, wall: float) -> None:
    """Every worker writes its own state file into the same new checkpoint folder;
    rank 0 names it in LATEST after a barrier, so LATEST only ever names a complete one."""
    from hvd_gradalign import distributed

    root = run_dir / "checkpoints"
    name = f"round-{state.round:06d}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".state-rank{rank}.", suffix=".npz")
    os.close(fd)
    np.savez(tmp, **state.to_arrays())
    checkpoint.readable_by_umask(tmp)
    os.replace(tmp, folder / f"state-rank{rank}.npz")
    distributed.barrier()
    if rank == 0:
        checkpoint.write_text_atomic(folder / "meta.json", json.dumps(
            {"round": state.round, "history": history, "wall_time": wall,
             "workers": distributed.size()}))
        # Verified on resume like the training checkpoints: every worker's state file.
        checkpoint.write_manifest(folder, ["meta.json"] + [f"state-rank{r}.npz"
                                                           for r in range(distributed.size())])
        checkpoint.publish(root, name, keep=2, pattern="round-*")
    distributed.barrier()


def _load(run_dir: Path, rank: int, workers: int, warn=print):
    from hvd_gradalign.federated import FederatedState

    folder = checkpoint.latest(run_dir / "checkpoints", warn=warn, pattern="round-*")
    if folder is None:
        return None
    meta = json.loads((folder / "meta.json").read_text())
    if meta["workers"] != workers:
        raise ValueError(f"{folder} was written by {meta['workers']} workers; resume it with "
                         f"the same number (clients' control variates are kept per worker)")
    state = FederatedState.from_arrays(dict(np.load(folder / f"state-rank{rank}.npz")))
    return state, meta


def _build_trainer(config):
    """The data, its split into clients, and the trainer of the config's algorithm."""
    import keras

    from hvd_gradalign import federated
    from hvd_gradalign.data import load_arrays
    from hvd_gradalign.models import build_model
    from train.config import federated_config

    c = typed(config)
    t, d, m = c.train, c.data, c.model
    info, (x, y), validation, test = load_arrays(
        d.dataset, d.data_dir or None, validation_samples=d.validation_samples,
        train_samples=d.train_samples, test_samples=d.test_samples, subset_seed=d.subset_seed)
    clients = _split(config, y, t.seed)
    keras.utils.set_random_seed(t.seed)
    model = build_model(m.model, info.input_shape, info.num_classes,
                        norm=None if m.norm == "default" else m.norm)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    trainer = federated.FederatedTrainer(model, model.loss, x, y, clients, federated_config(config))
    # every worker evaluates the same global model: rank 0's numbers are everyone's
    evaluated = {"test": test, "val": validation,
                 "train": (x[:10000], y[:10000]) if t.eval_train else None}
    return info, trainer, evaluated


def _evaluate(model, evaluated: dict) -> dict:
    row = {}
    for prefix, data in evaluated.items():
        if data is not None:
            res = model.evaluate(*data, batch_size=1000, verbose=0, return_dict=True)
            row.update({f"{prefix}_{k}": float(v) for k, v in res.items()})
    return row


def run_federated(config, run_dir: Path, log) -> int:
    import hvd_gradalign as hga
    from hvd_gradalign import distributed, federated
    from train.config import workers_phrase
    from train.recorder import exit_before_first_step, record_session, write_metrics, write_summary

    c = typed(config)
    f, t = c.federated, c.train
    rank, workers = hga.rank(), hga.size()
    summary_extra = lambda state: {"algorithm": f.algorithm, "rounds_done": state.round}  # noqa: E731
    info, trainer, evaluated = _build_trainer(config)

    resumed = _load(run_dir, rank, workers, warn=log) if t.resume else None
    if resumed is not None:
        state, meta = resumed
        history, wall_before = meta["history"], meta["wall_time"]
        log(f"resuming {run_dir} at round {state.round}")
    else:
        state, history, wall_before = trainer.initial_state(), [], 0.0
    if rank == 0:
        checkpoint.write_text_atomic(run_dir / "config.json", json.dumps(config, indent=1))
        record_session(run_dir, state.round)
    stop = hga.StopSignals(before_first_step=lambda name: exit_before_first_step(
        name, run_dir, workers, history, f"round {state.round}", **summary_extra(state)))
    sizes = [len(c) for c in trainer.clients]
    log(f"{info.name}: {len(trainer.y)} train samples in {len(sizes)} clients ({f.split}, "
        f"{min(sizes)}-{max(sizes)} samples each), {f.clients_per_round} per round, "
        f"{f.algorithm}, {workers_phrase(workers)}, run dir {run_dir}")

    started = time.perf_counter()
    cost = federated.ROUND_COST[f.algorithm]
    model_bytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in trainer.variables)
    interrupted = False
    while state.round < f.rounds:
        t0 = time.perf_counter()
        upcoming = state.round + 1
        state, metrics = trainer.run_round(state, log_variance=(
            upcoming % f.variance_every == 0 or upcoming == f.rounds))
        # per participating client, so far: synchronisations and bytes up and down
        row = {"round": state.round, "communications": state.round * cost.syncs,
               "bytes_up": state.round * cost.up * model_bytes, "bytes_down": state.round * cost.down * model_bytes,
               **metrics,
               "round_time": time.perf_counter() - t0}
        if state.round % f.eval_rounds == 0 or state.round == f.rounds:
            row.update(_evaluate(trainer.model, evaluated))
        row["wall_time"] = wall_before + time.perf_counter() - started
        history.append(row)
        if rank == 0:
            write_metrics(run_dir, history)
            if t.verbose:
                log("round {round}: ".format(**row) + ", ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if k not in ("round",)))
        stop.step_done()
        interrupted = stop.anywhere()
        every = t.checkpoint_every
        if interrupted or state.round == f.rounds or (every and state.round % every == 0):
            _save(run_dir, state, rank, history, row["wall_time"])
        if interrupted:
            break

    if rank == 0:
        write_summary(run_dir, "interrupted" if interrupted else "finished", workers, history,
                      time.perf_counter() - started, **summary_extra(state))
    distributed.barrier()
    if interrupted:
        log(f"stopped by {stop.received or 'a signal on another worker'}; checkpoint saved after "
            f"round {state.round}. Re-run the same command to resume.")
        return EXIT_INTERRUPTED
    log(f"finished: {run_dir}")
    return EXIT_OK
