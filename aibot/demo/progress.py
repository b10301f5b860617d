"""Live progress while the demo runs: a block redrawn in place on a terminal, one line per tick otherwise.

Rendering is pure (`render_block`, `render_line` from a `Snapshot`), so it is testable and the same
figures feed both forms; `Display` hands them to the CLI's live block (rich), which decides how to put
them on the screen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

from aibot.cli.render import LiveBlock, fmt_bytes

STATE_ORDER = ("queued", "running", "done", "skipped", "dead", "rejected", "cancelled")


@dataclass(frozen=True)
class ServerLine:
    name: str
    in_flight: Mapping[str, int]      # model -> generating now (simulator)
    slots_used: int
    slots_total: int
    ram_used: int
    ram_budget: int | None
    loads: int                        # instances loaded so far
    loading: int                      # instances loading now


@dataclass(frozen=True)
class Snapshot:
    elapsed: float
    phase: str                        # "posting", "draining", "stopping"
    posted: int
    planned: int
    states: Mapping[str, int]
    runnable: int
    replies: int
    replies_per_minute: float
    servers: tuple[ServerLine, ...] = field(default_factory=tuple)
    unplaced: tuple[tuple[str, int], ...] = ()   # (model, queued jobs) no usable server holds or is loading


def unplaced_text(s: Snapshot) -> str:
    """Models whose jobs wait where nothing can serve them yet (resident and loading nowhere)."""
    return ", ".join(f"{short_model(m)} {n}" for m, n in s.unplaced)


def short_model(model: str) -> str:
    return model.rsplit("/", 1)[-1]


def states_text(states: Mapping[str, int]) -> str:
    keys = [k for k in STATE_ORDER if states.get(k)] + sorted(k for k in states if k not in STATE_ORDER and states[k])
    return ", ".join(f"{k} {states[k]}" for k in keys) or "empty"


def server_text(s: ServerLine) -> str:
    flight = " ".join(f"{short_model(m)}:{n}" for m, n in sorted(s.in_flight.items()) if n) or "idle"
    budget = f"/{fmt_bytes(s.ram_budget)}" if s.ram_budget else ""
    loading = f" (+{s.loading} loading)" if s.loading else ""
    return (f"{s.name}: slots {s.slots_used}/{s.slots_total}, generating {flight}; "
            f"RAM {fmt_bytes(s.ram_used)}{budget}; loads {s.loads}{loading}")


def render_block(s: Snapshot) -> list[str]:
    lines = [
        f"[{s.elapsed:6.1f}s] {s.phase}: posted {s.posted}/{s.planned}, replies {s.replies} "
        f"({s.replies_per_minute:.0f}/min)",
        f"  queue: {states_text(s.states)} (runnable {s.runnable})",
    ]
    lines.extend(f"  {server_text(x)}" for x in s.servers)
    if s.unplaced:
        lines.append(f"  queued where nothing can serve them yet: {unplaced_text(s)}")
    return lines


def render_line(s: Snapshot) -> str:
    servers = " | ".join(
        f"{x.name} {x.slots_used}/{x.slots_total} slots, {sum(x.in_flight.values())} gen, "
        f"RAM {fmt_bytes(x.ram_used)}, loads {x.loads}{'+' + str(x.loading) if x.loading else ''}"
        for x in s.servers)
    return (f"[{s.elapsed:6.1f}s] {s.phase} posted {s.posted}/{s.planned} replies {s.replies} "
            f"({s.replies_per_minute:.0f}/min) queue: {states_text(s.states)} | {servers}"
            + (f" | unserved: {unplaced_text(s)}" if s.unplaced else ""))


def replies_per_minute(reply_times: list[float], now: float, started: float, window: float = 60.0) -> float:
    """Replies in the last `window` seconds, per minute; before a full window has passed, over the time so far."""
    span = min(window, max(now - started, 1e-9))
    recent = sum(1 for t in reply_times if now - span <= t <= now)
    return recent * 60.0 / span


class Display:
    """The block redrawn in place on a terminal (`tty`), a line per tick otherwise."""

    def __init__(self, stream: TextIO, tty: bool):
        self._block = LiveBlock(stream, plain=not tty)

    def show(self, snap: Snapshot) -> None:
        self._block.show(render_block(snap), render_line(snap))

    def say(self, text: str) -> None:
        """A message above the live block (the block stays below it)."""
        self._block.say(text)

    def close(self) -> None:
        """Ends the live block, leaving its last state on the screen."""
        self._block.close()
