"""Fixed-width text tables for the CLI.

Operators read these in terminals and paste them into tickets, so the output is plain text (no
colours, no box-drawing), columns are sized to their content up to a cap, numbers align right and
missing values print as '-'. Any command may reuse `render` and the formatters.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING = "-"


@dataclass(frozen=True)
class Column:
    key: str
    title: str | None = None
    fmt: Callable[[Any], str] | None = None
    max_width: int = 48
    align: str | None = None  # 'l' or 'r'; default: right for numbers, left otherwise

    @property
    def heading(self) -> str:
        return self.title if self.title is not None else self.key


def _cell(value: Any, col: Column) -> str:
    if col.fmt is not None and value is not None:
        text = col.fmt(value)
    elif value is None:
        text = MISSING
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    elif isinstance(value, dt.datetime):
        text = fmt_time(value)
    else:
        text = str(value)
    text = " ".join(text.split()) if ("\n" in text or "\t" in text) else text
    if len(text) > col.max_width:
        text = text[: max(col.max_width - 1, 1)] + "…"
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column | str], *, title: str | None = None,
           empty: str = "(none)") -> str:
    """The rows as an aligned table with a header line; `empty` when there are no rows."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    rows = list(rows)
    lines: list[str] = []
    if title:
        lines.append(title)
    if not rows:
        lines.append(f"  {empty}")
        return "\n".join(lines)
    cells = [[_cell(row.get(c.key), c) for c in cols] for row in rows]
    right = [
        c.align == "r" or (c.align is None and any(_is_number(row.get(c.key)) for row in rows))
        for c in cols
    ]
    widths = [max(len(c.heading), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  " + "  ".join(parts).rstrip()

    lines.append(line([c.heading.upper() for c in cols]))
    lines.append("  " + "  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in cells)
    return "\n".join(lines)


def fmt_seconds(value: float) -> str:
    """A duration readable at a glance: 0.4s, 12s, 3m05s, 2h10m, 3d4h."""
    sign = "-" if value < 0 else ""
    s = abs(float(value))
    if s < 10:
        return f"{sign}{s:.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{sign}{s // 86400}d{(s % 86400) // 3600}h"


def fmt_bytes(value: int | float) -> str:
    """Decimal units, as LM Studio and the sizing formula use them (1 GB = 10^9 bytes)."""
    v = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1000:
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1000
    return f"{v:.1f}TB"


def fmt_time(value: dt.datetime) -> str:
    """Local wall-clock time to the second; operators compare it with their logs."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
