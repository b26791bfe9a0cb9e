"""Tables the CLI prints (`kernelhub backends`): aligned columns that fit the terminal, wrapped
between words, or one record per row when even that cannot fit; unwrapped in a pipe.
"""

from __future__ import annotations

import os
import sys


def terminal_width() -> int | None:
    """The width tables wrap to: $COLUMNS, else the terminal's; None (no wrapping) when output goes to a
    pipe or a file and $COLUMNS is unset, so scripts and grep see one row per line."""
    import shutil

    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def format_table(rows: list[list[str]], *, wrap=(), width: int | None = None, indent: str = "") -> list[str]:
    """Rows (the first is the header) as aligned lines no wider than the terminal (`width`, else
    `terminal_width()`; unlimited when that is None): the `wrap` columns (named by header) shrink, widest first, and
    wrap onto continuation lines between words (a comma counts as a word's end). When even that
    cannot fit, each row becomes a record: its first cell, then one `header: value` line per cell.

    >>> print("\\n".join(format_table([["name", "status"], ["flash", "unavailable: needs CUDA and flash-attn"]],
    ...                               wrap=("status",), width=30)))
    name   status
    flash  unavailable: needs CUDA
           and flash-attn
    >>> print("\\n".join(format_table([["name", "status"], ["flash", "unavailable: needs CUDA"]], width=24)))
    flash
      status: unavailable:
        needs CUDA
    """
    import textwrap

    width = width or terminal_width() or 1 << 30
    shrinkable = [rows[0].index(name) for name in wrap if name in rows[0]]
    rows = [[cell.replace(",", ", ").replace(",  ", ", ") if i in shrinkable else cell for i, cell in enumerate(row)]
            for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    floor = {i: max(len(word) for row in rows for word in row[i].split() or [""]) for i in shrinkable}
    while len(indent) + sum(widths) + 2 * (len(widths) - 1) > width:
        i = max((j for j in shrinkable if widths[j] > floor[j]), key=lambda j: widths[j], default=None)
        if i is None:  # every wrapped column is down to its longest word: one record per row instead
            return _records(rows, width, indent)
        widths[i] -= 1
    lines = []
    for row in rows:
        cells = [textwrap.wrap(cell, widths[i], break_long_words=False, break_on_hyphens=False) or [""]
                 if i in shrinkable else [cell] for i, cell in enumerate(row)]
        for k in range(max(map(len, cells))):
            parts = [(cell[k] if k < len(cell) else "").ljust(w) for cell, w in zip(cells, widths)]
            lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def _records(rows: list[list[str]], width: int, indent: str) -> list[str]:
    """Each data row as its first cell, then `header: value` lines wrapped to `width`."""
    import textwrap

    lines = []
    for row in rows[1:]:
        lines.append(indent + row[0])
        for name, cell in zip(rows[0][1:], row[1:]):
            lines += textwrap.wrap(f"{name}: {cell}", max(20, width), initial_indent=indent + "  ",
                                   subsequent_indent=indent + "    ", break_on_hyphens=False)
    return lines
