"""python -m sweeps run SPEC [--launcher local|slurm] [--dry-run] [--wait]
python -m sweeps status SPEC
python -m sweeps report RUNS_DIR [--out DIR [--checkpoints]]
python -m sweeps restore SPEC --from DIR  (a fresh machine: the runs a report in DIR was made from)
python -m sweeps targets RUNS_DIR [RUNS_DIR ...] --target-from REPORT_DIR --out DIR  (steps to target)"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from sweeps import estimate, extend, state
from sweeps.local import LocalLauncher
from sweeps.selection import AT, TAIL
from sweeps.slurm import SlurmLauncher
from sweeps.spec import load
from train.config import ConfigError, budget, is_federated

TODO = (state.PENDING, state.FAILED, state.INTERRUPTED)


def _states(sweep, active=frozenset()):
    return {p.id: state.point_state(p.run_dir, active, budget(p.config)) for p in sweep.points}


LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher}


def _active():
    """Jobs any launcher's scheduler still holds: what tells a running point."""
    return set().union(*(launcher().active_jobs() for launcher in LAUNCHERS.values()))


def _selected(sweep, where):
    """The points whose grid values match every KEY=VALUE of ``where`` (compared as text,
    so batch_size=8192 and lr=0.1 read as written)."""
    wanted, known = [], {k for p in sweep.points for k in p.params}
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where expects KEY=VALUE, got {item!r}")
        if key not in known:
            raise ConfigError(f"--where {item}: {key!r} is not a grid key of {sweep.path}; "
                              f"grid keys are {sorted(known)}")
        wanted.append((key, value.strip()))
    return [p for p in sweep.points
            if all(key in p.params and str(p.params[key]) == value for key, value in wanted)]


def cmd_run(args) -> int:
    sweep = load(args.spec, args.runs_root)
    launcher = LAUNCHERS[args.launcher]()
    states = _states(sweep, launcher.active_jobs())
    points = _selected(sweep, args.where)
    if args.where and not points:
        raise ConfigError(f"no point of {sweep.path} has {' and '.join(args.where)}")
    todo = [p for p in points if states[p.id] in TODO]
    print(f"sweep {sweep.name}: {len(points)} points{' selected' if args.where else ''}, {len(todo)} to run "
          f"({', '.join(f'{n} {s}' for s, n in sorted(Counter(states.values()).items()))})")
    continued = extend.predecessors(sweep, states)
    if args.dry_run:
        for p in todo:
            what = " ".join(f"{k}={v}" for k, v in p.params.items())
            how = ", ".join(filter(None, (states[p.id], _continues(p, continued))))
            print(f"  would run {p.id} [{how}] {what} -> {p.run_dir}")
        return 0
    if not todo:
        return 0
    def seed(p, found):
        if found and extend.continue_from_predecessor(p, found):
            print(f"  {p.id} {_continues(p, {p.id: found})} (a copy; that run stays)", flush=True)

    for p in todo:
        seed(p, continued.get(p.id))
    try:
        # A shorter run that finishes while this launcher runs is continued too.
        handle = launcher.submit(sweep, todo, before_each=lambda p: seed(p, extend.predecessor_now(sweep, p)))
    except KeyboardInterrupt:
        print("interrupted; the current point checkpointed where it could. Run the same command "
              "again to resume", flush=True)
        return 130
    if launcher.detached:
        print(launcher.describe(handle, len(todo)))
        if not args.wait:
            return 0
        launcher.wait(handle)
    states = _states(sweep, launcher.active_jobs())
    # A point another local launcher is still running is that launcher's to report.
    elsewhere = [p.id for p in todo if p.id in launcher.skipped and states[p.id] != state.DONE]
    bad = [p.id for p in todo if states[p.id] != state.DONE and p.id not in elsewhere]
    ended = f"job {handle} ended" if launcher.detached else "done"
    print(f"{ended}: {len(todo) - len(bad) - len(elsewhere)} done, {len(bad)} not done"
          + (f", {len(elsewhere)} still running in another launcher" if elsewhere else ""))
    return 1 if bad else 0


def _unit(point):
    return "rounds" if is_federated(point.config) else "epochs"


def _continues(point, continued):
    """'continues ID after N epochs' for a pending point that will start from a copy of
    a shorter finished run (extend.predecessors), else ''."""
    found = continued.get(point.id)
    return f"continues {found[0].name} after {found[1]} {_unit(point)}" if found else ""


def cmd_status(args) -> int:
    sweep = load(args.spec, args.runs_root)
    states = _states(sweep, _active())
    continued = extend.predecessors(sweep, states)
    for p in sweep.points:
        what = " ".join(f"{k}={v}" for k, v in p.params.items())
        notes = [_continues(p, continued)]
        if states[p.id] in (state.RUNNING, state.INTERRUPTED, state.FAILED) and p.run_dir.exists():
            notes.append(f"{_unit(p)[:-1]} {estimate.units_done(p.run_dir)} of {budget(p.config)}")
        notes = "; ".join(n for n in notes if n)
        print(f"{states[p.id]:12s} {p.id} {what}" + (f" ({notes})" if notes else ""))
    counts = Counter(states.values())
    print(", ".join(f"{counts[s]} {s}" for s in (state.DONE, state.RUNNING, state.FAILED,
                                                  state.INTERRUPTED, state.PENDING)))
    print(estimate.describe(estimate.remaining(sweep, states, continued)))
    return 0


def cmd_report(args) -> int:
    from sweeps.report import pending_row, report

    header, pending = "", []
    if args.spec:
        runs_dir = Path(args.runs_dir).resolve()
        # The runs folder is <runs root>/<sweep name>: its parent is the runs root.
        sweep = load(args.spec, runs_dir.parent)
        if sweep.name != runs_dir.name:
            raise SystemExit(f"{args.spec} is the sweep {sweep.name!r}, but {args.runs_dir} holds the runs of "
                             f"a sweep named {runs_dir.name!r}: pass that sweep's spec, or no --spec")
        states = _states(sweep, _active())
        done = sum(v == state.DONE for v in states.values())
        if done < len(states):
            header = (f"PARTIAL: {done} of the {len(states)} points of {args.spec} are done "
                      f"({', '.join(f'{n} {s}' for s, n in sorted(Counter(states.values()).items()))}); "
                      "the sweep resumes with `python -m sweeps run` on the same spec.\n\n")
        pending = [pending_row(p.id, p.config, p.workers) for p in sweep.points if not p.run_dir.exists()]
    try:
        report(args.runs_dir, args.out, args.at, header=header, pending=pending, checkpoints=args.checkpoints,
               equal_cost=args.equal_cost)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return 0


def cmd_restore(args) -> int:
    from sweeps import archive

    sweep = load(args.spec, args.runs_root)
    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder: pass the folder a report of {sweep.name} was "
                                "written to (--out), which holds its results.csv and runs/")
    try:
        counts = archive.restore(sweep, source, args.at)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"sweep {sweep.name}: restored {counts['records']} run(s) from {source / archive.RECORDS} "
          f"({counts['resumable']} of them interrupted, with a checkpoint that `run` resumes from), "
          f"{counts['table']} from the rows of {source / 'results.csv'} alone (no per-epoch metrics); "
          f"{counts['kept']} already had a folder in {sweep.runs_dir} and were left as they are")
    return 0


def cmd_targets(args) -> int:
    from sweeps import targets

    try:
        targets.write(args.runs_dirs, args.target_from, args.out)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the points that are not done yet")
    r.add_argument("spec")
    r.add_argument("--launcher", choices=tuple(LAUNCHERS), default="local")
    r.add_argument("--dry-run", action="store_true", help="print what would run")
    r.add_argument("--wait", action="store_true", help="slurm: wait for the job array to end")
    r.add_argument("--runs-root", help="where sweeps keep their runs (default: <repo>/runs)")
    r.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="run only the points with this grid value (repeatable), e.g. a launcher "
                        "of its own for the longest points: --where batch_size=8192")
    s = sub.add_parser("status", help="done, running, failed, interrupted and pending points")
    s.add_argument("spec")
    s.add_argument("--runs-root")
    rep = sub.add_parser("report", help="results.csv, a Markdown table and plots")
    rep.add_argument("runs_dir")
    rep.add_argument("--out", help="where to write (default: RUNS_DIR)")
    rep.add_argument("--spec", help="the sweep's spec: the report then says how much of it is done")
    rep.add_argument("--at", choices=AT, default="final",
                     help="which epoch of each run counts: the last, the evaluated epoch "
                          f"with the best validation accuracy, or the mean of the last {TAIL} "
                          "evaluations (for noisy curves that have flattened)")
    rep.add_argument("--checkpoints", action="store_true",
                     help="with --out: also park each interrupted run there (its records and newest "
                          "checkpoint, one model with its optimizer state), so that `restore` on a "
                          "fresh machine lets `run` resume it instead of starting it over")
    rep.add_argument("--equal-cost", action="store_true",
                     help="read each batch at one budget of gradient passes per sample (epochs x 2 for "
                          "GradAlign, SAM and the penalty, x 1 for SGD) instead of one budget of epochs")
    t = sub.add_parser("targets", help="updates and gradient evaluations to small-batch SGD's validation "
                                       "accuracy, per run (steps to target)")
    t.add_argument("runs_dirs", nargs="+", help="sweep runs folders, e.g. runs/fashion_mnist_price")
    t.add_argument("--target-from", required=True, metavar="REPORT_DIR",
                   help="a report (folder or results.csv, read at best_val) whose SGD at its smallest "
                        "batch sets the target, e.g. docs/results/fashion_mnist_batch_curve")
    t.add_argument("--out", required=True, help="where steps_to_target.{csv,md,png} go")
    res = sub.add_parser("restore", help="put back the runs a report's folder holds (a fresh machine)")
    res.add_argument("spec")
    res.add_argument("--from", dest="source", required=True, metavar="REPORT_DIR",
                     help="a folder a report of this sweep was written to, e.g. docs/results/NAME")
    res.add_argument("--at", choices=AT,
                     help="the reading its results.csv was made at; needed only for runs that survive "
                          "as rows of that table alone")
    res.add_argument("--runs-root")
    args = p.parse_args(argv)
    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report,
                "restore": cmd_restore, "targets": cmd_targets}[args.command](args)
    except (ConfigError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
