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
    """A plain-text table (`pipeline.tables.format_table`) on stdout."""
    from ..tables import format_table

    result(format_table(headers, rows, align))
