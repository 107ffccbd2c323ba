"""The reports' Markdown tables."""

from __future__ import annotations

MISSING = "–"


def table(header, rows, right=()) -> list[str]:
    """A Markdown table as lines: ``header`` cells, then ``rows`` (lists of cells); the
    columns whose indices are in ``right`` are right-aligned."""
    rule = "|" + "".join("---:|" if i in right else "---|" for i in range(len(header)))
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def grid(corner, rows, columns, cell, right=()) -> list[str]:
    """A table with a row per entry of ``rows`` and a column per entry of ``columns``;
    ``cell(row, column)`` gives each cell, None for an empty one (shown as a dash)."""
    return table([corner, *map(str, columns)],
                 [[row, *(MISSING if (c := cell(row, col)) is None else c for col in columns)] for row in rows],
                 right)
