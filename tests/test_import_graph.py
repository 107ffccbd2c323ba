"""No module of the project imports, directly or through others, a module that imports
it back (function-level imports included): each package reads in one direction. The
TensorFlow-free part (hvd_gradalign_base) stays free of it, and the sweeps' bookkeeping
and the training config start without TensorFlow."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("hvd_gradalign_base", "hvd_gradalign", "train", "sweeps")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                # a package's __init__ re-exporting its modules is not a cycle with them
                if t and t != name and not (path.name == "__init__.py" and t.startswith(name + ".")):
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph) -> list:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_library_imports_neither_train_nor_sweeps():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("hvd_gradalign"):
            assert not {e for e in edges if e.split(".")[0] in ("train", "sweeps")}, name


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_base_imports_nothing_of_the_project_but_itself():
    for name, edges in import_graph().items():
        if name.startswith("hvd_gradalign_base"):
            assert {e for e in edges if not e.startswith("hvd_gradalign_base")} == set(), name


# Every module a sweep's bookkeeping (status, report, restore, extend, a SLURM task's record)
# and the config's validation load; the local launcher and SLURM submission too, since they
# only start training processes.
TENSORFLOW_FREE = ["hvd_gradalign_base.files", "hvd_gradalign_base.settings", "hvd_gradalign_base.strategies",
                   "hvd_gradalign_base.federated_settings", "train.config", "train.schema",
                   "train.launch", "train.exit_codes", "sweeps.cli", "sweeps.state", "sweeps.report",
                   "sweeps.federated_report", "sweeps.archive", "sweeps.extend", "sweeps.targets",
                   "sweeps.record", "sweeps.estimate", "sweeps.selection", "sweeps.spec", "sweeps.local",
                   "sweeps.slurm"]


def _heavy_modules_after(code: str) -> list:
    probe = (f"import sys\n{code}\nimport json\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'tensorflow', 'keras', 'horovod', 'tensorflow_datasets', 'hvd_gradalign'})))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    *printed, heavy = out.stdout.strip().splitlines()
    return json.loads(heavy), "\n".join(printed)


def test_sweeps_bookkeeping_and_config_import_no_tensorflow():
    assert _heavy_modules_after("\n".join(f"import {m}" for m in TENSORFLOW_FREE))[0] == []


def test_sweeps_help_and_status_run_without_tensorflow(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(f"""
[sweep]
name = "tiny"
base_config = "{REPO / 'train/configs/fashion_mnist.toml'}"
runs_root = "{tmp_path / 'runs'}"
[fixed]
epochs = 1
train_samples = 1024
[[grid]]
batch_size = [128, 256]
""")
    code = ("from sweeps.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"main(['status', {str(spec)!r}])")
    heavy, printed = _heavy_modules_after(code)
    assert "usage: python -m sweeps" in printed and "0 done, 0 running, 0 failed, 0 interrupted, 2 pending" in printed
    assert heavy == []


def test_every_model_name_has_a_builder():
    from hvd_gradalign.models import MODELS
    from hvd_gradalign_base.settings import MODEL_NAMES

    assert tuple(MODELS) == MODEL_NAMES


def test_every_strategy_module_is_an_algorithm_with_an_oracle_scenario():
    """A strategy is found by its module's presence, under its module's name, and cannot
    come in without a scenario that the oracle, 2-worker and resume tests run."""
    import pkgutil

    from hvd_gradalign_base import strategies
    from hvd_gradalign_base.federated_settings import ALGORITHMS, ROUND_COST
    from tests.federated_scenarios import SCENARIOS

    modules = {m.name for m in pkgutil.iter_modules(strategies.__path__)}
    assert set(ALGORITHMS) == modules and set(ROUND_COST) == modules
    assert all(issubclass(s, strategies.FedAvg) for s in strategies.STRATEGIES.values())
    assert set(ALGORITHMS) <= {spec["algorithm"] for spec in SCENARIOS.values()}
