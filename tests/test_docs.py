"""The documentation: the site builds with ``mkdocs build --strict`` and shows the code's
own docstrings and config keys, and every example on its pages runs as written.

Examples are the fenced ``python`` and ``bash`` blocks of README.md and of the pages under
docs/ (the generated report folders under docs/results/<sweep>/ hold none). A block runs
unless the line before it says why not: ``<!-- not run: REASON -->`` (a GPU, a SLURM
cluster, hours of compute). ``<!-- workers: N -->`` runs a Python block on N workers under
horovodrun. ``toml`` blocks are loaded as training configs, with every check of
``python -m train``. Each block runs in a fresh folder that mirrors the checkout (links to
its files) with the virtualenv's bin first on PATH, so ``runs/`` it writes stay there.

A small runner of our own rather than pytest-examples or sybil: those run Python blocks
in-process (one Horovod initialisation per process makes that unworkable) and do not run
shell blocks under horovodrun; this is 100 lines that do exactly what the pages need.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
RUN_LANGUAGES = {"python", "bash", "sh"}
MARKER = re.compile(r"^\s*<!--\s*(not run|workers)\s*:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass
class Example:
    page: str
    line: int
    language: str
    code: str
    not_run: str | None = None   # the reason, when marked
    workers: int = 1

    @property
    def id(self):
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs/guides").glob("*.md")),
             *sorted((REPO / "docs/results").glob("*.md"))]
    return pages


def examples(page: Path) -> list[Example]:
    return parse(page.read_text(), str(page.relative_to(REPO)))


def parse(text: str, page: str) -> list[Example]:
    """The fenced blocks of a page, each with the marker on the line before it."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, language, start = len(fence.group(1)), fence.group(2), i
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:])
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        example = Example(page, start + 1, language, "\n".join(body) + "\n")
        if marker and marker.group(1) == "not run":
            example.not_run = marker.group(2)
        elif marker:
            example.workers = int(marker.group(2))
        found.append(example)
    return found


ALL = [e for page in doc_pages() for e in examples(page)]
RUNNABLE = [e for e in ALL if e.language in RUN_LANGUAGES | {"toml"} and e.not_run is None]


def test_every_example_is_run_or_says_why_not():
    assert RUNNABLE, "no example found: the parser is broken"
    unmarked_languages = [e.id for e in ALL if e.language == "" and e.not_run is None]
    assert not unmarked_languages, f"fenced blocks without a language: {unmarked_languages}"
    no_reason = [e.id for e in ALL if e.not_run is not None and len(e.not_run) < 10]
    assert not no_reason, f"'not run' needs a reason: {no_reason}"


def test_a_marker_reaches_the_block_after_it_and_indented_blocks_are_dedented():
    text = ("text\n\n<!-- not run: needs a GPU to mean anything -->\n```bash\nnvidia-smi\n```\n\n"
            "<!-- workers: 2 -->\n  ```python\n  print(1)\n  ```\n```toml\n[train]\n```\n")
    got = [(e.language, e.not_run, e.workers, e.code, e.line) for e in parse(text, "page.md")]
    assert got == [("bash", "needs a GPU to mean anything", 1, "nvidia-smi\n", 4),
                   ("python", None, 2, "print(1)\n", 9), ("toml", None, 1, "[train]\n", 12)]


def sandbox(tmp_path: Path) -> Path:
    """A folder that looks like the checkout (links to its entries) without its runs/."""
    root = tmp_path / "checkout"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {"runs", "site", ".git", ".pytest_cache"}:
            (root / entry.name).symlink_to(entry)
    return root


def run(cmd, cwd, timeout=900):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2", "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.id for e in RUNNABLE])
def test_the_example_runs_as_written(example, tmp_path):
    root = sandbox(tmp_path)
    if example.language == "toml":
        (root / "example.toml").write_text(example.code)
        run([sys.executable, "-c", "from train.config import load; load(['--config', 'example.toml'])"], root)
    elif example.language == "python":
        (root / "example.py").write_text(example.code)
        if example.workers > 1:
            run([str(VENV_BIN / "horovodrun"), "-np", str(example.workers), "-H", f"localhost:{example.workers}",
                 "--gloo", sys.executable, "example.py"], root)
        else:
            run([sys.executable, "example.py"], root)
    else:
        run(["bash", "-euo", "pipefail", "-c", example.code], root)


def test_the_site_builds_strict_with_the_codes_docstrings_and_config_keys(tmp_path):
    site = tmp_path / "site"
    run([str(VENV_BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)], REPO, timeout=600)
    api = (site / "api" / "index.html").read_text()
    from hvd_gradalign.optimizers import GradAlign
    first_line = GradAlign.__doc__.strip().splitlines()[0]
    assert first_line.split("(")[0] in api
    for name in ("GradAlign", "SAM", "GradientPenalty", "DistributedOptimizer", "two_pass_step", "CollectiveStop",
                 "FederatedTrainer"):
        assert f'id="hvd_gradalign.{name}"' in api or f'id="hvd_gradalign.federated.{name}"' in api, name
    reference = (site / "guides" / "config" / "index.html").read_text()
    from train.schema import SECTIONS
    for section in SECTIONS.values():
        for key in section.keys():
            assert f"<code>{key}</code>" in reference, f"{section.name}.{key} missing from the config reference"


def test_the_readmes_links_and_images_exist():
    """README.md is outside the site (GitHub shows it), so mkdocs does not check its links."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    local = [t for t in targets if "://" not in t]
    assert len(local) >= 10, local
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
