"""The one place the CLI prints: results to stdout, progress and errors to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def result(message: str) -> None:
    print(message, flush=True)


def error(message: str) -> None:
    first = " ".join(str(message).split("\n")[0].split()) or "failed"
    print(f"error: {first}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def as_json(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> None:
    """A plain-text table; `align` is one of 'l'/'r' per column (default: numbers right)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join(
            "r" if rows and all(_numeric(r[i]) for r in rows) else "l" for i in range(len(headers))
        )

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    result(fmt(list(headers)))
    result("  ".join("-" * w for w in widths))
    for r in rows:
        result(fmt(r))


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("MGK%x"))
        return True
    except ValueError:
        return cell == ""
