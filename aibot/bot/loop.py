"""The bot's poll loop: read new messages from a source, ingest them, wait, repeat; never crash.

Each pass reads the cursor, asks the source for what is new, and ingests the batch together with the
new cursor in one transaction (`aibot.bot.ingest`). A failure anywhere (chat API down, database
restarting, a bad config edit) is logged and retried with exponential backoff; the cursor has not
moved, so nothing is skipped. A full page is followed by an immediate re-poll, so a backlog drains
without waiting an interval per page. Waiting uses `stop_event.wait`, so SIGTERM stops it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aibot.bot import cursor as cursors
from aibot.bot.ingest import IngestResult, ingest
from aibot.bot.sources import Source

log = logging.getLogger("aibot.bot.loop")

DEFAULT_POLL_SECONDS = 30.0   # the original's default when botSettings.pollingInterval is unset
MAX_BACKOFF_SECONDS = 60.0


@dataclass
class LoopStats:
    polls: int = 0
    errors: int = 0
    new: int = 0
    duplicate: int = 0
    rejected: int = 0
    ignored: int = 0
    last_error: str | None = None
    results: list[IngestResult] = field(default_factory=list, repr=False)

    def add(self, r: IngestResult) -> None:
        self.new += r.new
        self.duplicate += r.duplicate
        self.rejected += r.rejected
        self.ignored += r.ignored


def poll_interval_seconds(config: Any, override: float | None = None) -> float:
    if override is not None:
        return max(0.0, float(override))
    ms = getattr(getattr(config, "bot_settings", None), "polling_interval_ms", None)
    if isinstance(ms, int | float) and not isinstance(ms, bool) and ms > 0:
        return ms / 1000.0
    return DEFAULT_POLL_SECONDS


def backoff_seconds(consecutive_errors: int, base: float = 1.0, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """1, 2, 4, ... seconds after consecutive failures, capped."""
    return min(cap, base * 2 ** max(0, consecutive_errors - 1))


def poll_once(database: Any, source: Source, config: Any, *, settings: Any = None) -> tuple[IngestResult, bool]:
    """One read + ingest. Returns the result and whether the source has more right away."""
    # Autocommit: no transaction is held open across the source's network call, and the ingest's
    # transaction (jobs, cursor, doorbell) is its own, one round trip (`db.one_round_trip`).
    with database.autocommit() as conn:
        position = cursors.load(conn, source.name)
        batch = source.poll(conn, position)
        result = ingest(conn, source.name, batch.messages, config, settings=settings, cursor=batch.position)
    return result, batch.more


def run_bot(settings: Any, config_store: Any, source: Source, stop_event: threading.Event, *,
            database: Any = None, poll_interval: float | None = None, once: bool = False,
            max_backoff: float = MAX_BACKOFF_SECONDS) -> LoopStats:
    """Polls until `stop_event` is set (or, with `once`, until the source has nothing more right now).

    The config is re-read from `config_store` every pass, so entity edits apply to the next batch.
    With `once`, an error ends the run (counted in the stats) instead of being retried.
    """
    if database is None:
        from aibot.db import Database

        database = Database(getattr(settings, "database_url", None))
    stats = LoopStats()
    failures = 0
    while not stop_event.is_set():
        started = time.monotonic()
        more = False
        interval = poll_interval_seconds(None, poll_interval)
        try:
            config = config_store.get()
            interval = poll_interval_seconds(config, poll_interval)
            result, more = poll_once(database, source, config, settings=settings)
            stats.polls += 1
            stats.add(result)
            if once:
                stats.results.append(result)
            failures = 0
        except Exception as exc:
            failures += 1
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            if once:
                log.error("poll of %s failed: %s", source.name, stats.last_error)
                break
            delay = backoff_seconds(failures, cap=max_backoff)
            log.warning("poll of %s failed (%d in a row), retrying in %.1fs: %s", source.name, failures, delay,
                        stats.last_error)
            stop_event.wait(delay)
            continue
        if more:
            continue
        if once:
            break
        stop_event.wait(max(0.0, interval - (time.monotonic() - started)))
    return stats
