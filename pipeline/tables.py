"""The one plain-text table format, for the CLI and for jobs' own output.

    print(format_table(["trial", "val err"], [["t1", "0.0300"]]))
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """Columns padded to their widest cell; `align` is 'l'/'r' per column (default: numbers right)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join("r" if rows and all(_numeric(r[i]) for r in rows) else "l"
                        for i in range(len(headers)))

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([fmt(list(headers)), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("MGK%x*"))
        return True
    except ValueError:
        return cell == ""
