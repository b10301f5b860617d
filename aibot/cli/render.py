"""How the CLI shows things: tables, values, live views and progress, through `rich`.

Two forms, chosen once per process:
- on a terminal, rich tables with a coloured header and live views redrawn in place (`aibot top`,
  the demo's block, a model load's spinner);
- plain, when stdout is not a terminal, with `--plain`, or when NO_COLOR is set (https://no-color.org):
  no escape codes and no box-drawing, a title line, an upper-case header, a dashed rule and one line
  per row, columns aligned, lines not wrapped and without trailing blanks, so operators can paste it
  into tickets and scripts can split it. Live views become one snapshot after another.

Text from the queue (messages, reasons, errors) is never read as rich markup: a reason like
"[SKIP]" prints as written.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.padding import Padding
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

MISSING = "-"
PLAIN_WIDTH = 10_000          # plain output never wraps; rich needs some width to lay tables out
# Plain tables: no edges, one dashed rule under the header.
PLAIN_BOX = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)

_force_plain = False


def configure(*, plain: bool = False) -> None:
    """Called once by `aibot` from `--plain`."""
    global _force_plain
    _force_plain = plain


def is_plain(file: TextIO | None = None) -> bool:
    f = file if file is not None else sys.stdout
    if _force_plain or os.environ.get("NO_COLOR"):
        return True
    isatty = getattr(f, "isatty", None)
    return not (isatty and isatty())


def console(file: TextIO | None = None, *, plain: bool | None = None) -> Console:
    """A console on `file` (default: the current sys.stdout, so tests' captures see it)."""
    f = file if file is not None else sys.stdout
    plain = is_plain(f) if plain is None else plain
    if plain:
        return Console(file=f, width=PLAIN_WIDTH, color_system=None, force_terminal=False, no_color=True,
                       highlight=False, markup=False, emoji=False, soft_wrap=True)
    # Not plain means a terminal was seen (or asked for): say so, so rich draws live views on any file.
    return Console(file=f, force_terminal=True, highlight=False, markup=False, emoji=False)


# --- values --------------------------------------------------------------------------------------------

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


# Cell values that carry a meaning worth a colour on a terminal (plain output ignores styles).
STATE_STYLES = {"healthy": "green", "down": "red", "degraded": "yellow", "draining": "yellow",
                "dead": "red", "rejected": "magenta", "running": "cyan", "done": "green", "failed": "red"}


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


def cell_text(value: Any, col: Column) -> str:
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
    text = " ".join(text.split()) if ("\n" in text or "\t" in text or "\r" in text) else text
    if len(text) > col.max_width:
        text = text[: max(col.max_width - 1, 1)] + "…"
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column | str], *, title: str | None = None,
          empty: str = "(none)") -> RenderableType:
    """The rows as a table; numbers align right, missing values print as '-', long cells are cut."""
    return TableView(list(rows), [c if isinstance(c, Column) else Column(c) for c in columns], title, empty)


@dataclass(frozen=True)
class TableView:
    """Rows and columns, laid out when printed: the plain form on a console without colour (see the
    module doc), a rich table otherwise; a table without rows is its title and an indented note."""

    rows: list[Mapping[str, Any]]
    columns: list[Column]
    title: str | None
    empty: str

    def __rich_console__(self, con: Console, options) -> Iterator[RenderableType]:
        plain = con.no_color or con.color_system is None
        if not self.rows:
            if self.title:
                yield Text(self.title, style="" if plain else "bold")
            yield Text(f"  {self.empty}", style="" if plain else "dim")
            return
        if plain:
            # Title on its own line, table indented by two spaces, two spaces between columns: the
            # layout operators' scripts already split (`line.split()`, rows from the fourth line).
            t = Table(box=PLAIN_BOX, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="")
        else:
            t = Table(title=self.title, title_justify="left", title_style="bold", header_style="bold cyan",
                      box=box.SIMPLE_HEAD, show_edge=False, pad_edge=True, padding=(0, 1))
        for c in self.columns:
            right = c.align == "r" or (c.align is None and any(_is_number(r.get(c.key)) for r in self.rows))
            t.add_column(c.heading.upper(), justify="right" if right else "left", no_wrap=True, overflow="ellipsis")
        for r in self.rows:
            texts = [cell_text(r.get(c.key), c) for c in self.columns]
            t.add_row(*(Text(x, style="" if plain else STATE_STYLES.get(x, "")) for x in texts))
        if plain:
            if self.title:
                yield Text(self.title)
            yield Padding(t, (0, 0, 0, 2), expand=False)
        else:
            yield t


def to_text(*renderables: RenderableType, plain: bool = True, width: int | None = None) -> str:
    """What `print_` would write, as a string (plain by default): pure functions and tests use it."""
    buf = io.StringIO()
    con = console(buf, plain=plain)
    if width is not None:
        con.width = width
    for r in renderables:
        con.print(r)
    text = buf.getvalue()
    return "\n".join(line.rstrip() for line in text.split("\n")) if plain else text


def print_(*renderables: RenderableType, file: TextIO | None = None) -> None:
    """Writes to stdout (or `file`) in the form `is_plain` picks; plain lines carry no trailing blanks."""
    f = file if file is not None else sys.stdout
    if is_plain(f):
        f.write(to_text(*renderables, plain=True))
        f.flush()
    else:
        console(f, plain=False).print(*renderables)


# --- live views ----------------------------------------------------------------------------------------

def live_loop(frame: Callable[[], RenderableType], *, interval: float, iterations: int | None,
              footer: str = "", file: TextIO | None = None) -> int:
    """Shows `frame()` every `interval` seconds: redrawn in place on a terminal (the alternate screen,
    as top does), one snapshot after another when plain. Returns after `iterations`, or on Ctrl-C."""
    f = file if file is not None else sys.stdout
    n = 0
    if is_plain(f):
        while True:
            print_(frame(), file=f)
            n += 1
            if iterations is not None and n >= iterations:
                return 0
            time.sleep(interval)  # the refresh period itself, not synchronisation
            f.write("\n")
    con = console(f, plain=False)
    with Live(console=con, screen=True, auto_refresh=False, transient=True) as live:
        while True:
            view = frame()
            live.update(Group(view, Text(footer, style="dim")) if footer else view, refresh=True)
            n += 1
            if iterations is not None and n >= iterations:
                return 0
            time.sleep(interval)  # the refresh period itself, not synchronisation


class LiveBlock:
    """A block redrawn in place below the messages printed with `say` (the demo's live view), or one line
    per update when plain. `show(block, line)`: the block for a terminal, the line for plain output."""

    def __init__(self, file: TextIO | None = None, *, plain: bool | None = None):
        self.file = file if file is not None else sys.stdout
        self.plain = is_plain(self.file) if plain is None else plain
        self._live: Live | None = None

    def show(self, block: Sequence[str], line: str) -> None:
        if self.plain:
            self.file.write(line + "\n")
            self.file.flush()
            return
        view = Group(*(Text(x, no_wrap=True, overflow="ellipsis") for x in block))
        if self._live is None:
            self._live = Live(view, console=console(self.file, plain=False), auto_refresh=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        self._live.update(view, refresh=True)

    def say(self, text: str) -> None:
        """A message above the live block; the block stays below it."""
        if self._live is not None:
            self._live.console.print(Text(text))
        else:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class Ticker:
    """Progress of one slow step (a model load): a spinner with the elapsed time on a terminal, a line
    every `interval` seconds when plain."""

    def __init__(self, message: str, *, interval: float = 2.0, file: TextIO | None = None):
        self.message = message
        self.interval = interval
        self.file = file if file is not None else sys.stdout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Progress | None = None

    def __enter__(self) -> Ticker:
        if is_plain(self.file):
            self.file.write(self.message + "\n")
            self.file.flush()
            started = time.monotonic()

            def tick():
                while not self._stop.wait(self.interval):
                    self.file.write(f"  ... {time.monotonic() - started:.0f}s\n")
                    self.file.flush()

            self._thread = threading.Thread(target=tick, daemon=True)
            self._thread.start()
        else:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=console(self.file, plain=False), transient=True)
            self._progress.start()
            self._progress.add_task(self.message, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._progress is not None:
            self._progress.stop()

