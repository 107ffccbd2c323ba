"""MkDocs hooks: pages whose content comes from the code, so that they cannot drift.

``<!-- config-reference -->`` in a page becomes one table per section of the training
configuration, read from ``train/schema.py`` (every key, its type, default and meaning).
"""

from __future__ import annotations

import sys
from pathlib import Path

PLACEHOLDER = "<!-- config-reference -->"
REPO = Path(__file__).resolve().parents[1]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from train.schema import SECTIONS

    parts = []
    for name, section in SECTIONS.items():
        defaults = section.defaults()
        parts += [f"### `[{name}]`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in section.keys().items():
            meaning = field.metadata["help"]
            if field.metadata["choices"]:
                meaning += " (one of " + ", ".join(f"`{c}`" for c in field.metadata["choices"]) + ")"
            default = defaults[key]
            parts.append(f"| `{key}` | {section.key_type(key).__name__} | `{default!r}` | {_cell(meaning)} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, config_reference())
    return markdown
