"""Turns the jobs table's NOTIFY events into the original monitor's WebSocket frames.

One listener thread per `aibot serve` holds a dedicated connection on channel `aibot_events` (the
triggers of 0005_inspection.sql) and fans frames out to every dashboard. The NOTIFY payload carries ids
only, so `queued` items are read back in one query per batch. Each subscriber has a bounded outbound
queue on the server's event loop, drained by that connection's sender task: a slow browser is dropped
instead of stalling the others, and the listener thread never waits on a socket.
If the listening connection breaks, events may have been missed, so after reconnecting every client
gets a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import psycopg

from aibot import db
from aibot.ops import inspection

log = logging.getLogger("aibot.web.events")

CHANNEL = "aibot_events"


def now_ms() -> int:
    return int(time.time() * 1000)


def frame(kind: str, data: Any, timestamp: int | None = None) -> dict:
    """The original monitor's frame shape: {type, data, timestamp (ms)}."""
    return {"type": kind, "data": data, "timestamp": now_ms() if timestamp is None else timestamp}


def parse_events(payloads: Iterable[str]) -> list[dict]:
    events = []
    for p in payloads:
        try:
            ev = json.loads(p)
        except ValueError:
            log.warning("ignoring a malformed %s payload: %.80r", CHANNEL, p)
            continue
        if isinstance(ev, dict) and ev.get("type") and isinstance(ev.get("id"), int):
            events.append(ev)
    return events


def queued_ids(events: Iterable[dict]) -> list[int]:
    return sorted({e["id"] for e in events if e["type"] == "queued"})


def frames_for(events: Iterable[dict], items: dict[int, dict], timestamp: int | None = None) -> list[dict]:
    """Frames for a batch of events, in order. A `queued` job that no longer exists is left out."""
    out = []
    for e in events:
        kind, job_id = e["type"], e["id"]
        if kind == "queued":
            if job_id in items:
                out.append(frame("queued", {"item": items[job_id]}, timestamp))
        elif kind == "claimed":
            out.append(frame("claimed", {"itemId": job_id, "serverId": e.get("server_id"),
                                         "worker": e.get("worker")}, timestamp))
        elif kind == "completed":
            out.append(frame("completed", {"itemId": job_id, "success": bool(e.get("success")),
                                           "state": e.get("state")}, timestamp))
        elif kind == "deleted":
            out.append(frame("deleted", {"itemId": job_id}, timestamp))
    return out


def snapshot_data(conn: psycopg.Connection) -> dict:
    return {"items": inspection.queue_items(conn), "stats": {**inspection.monitor_stats(conn), "configVersion": None}}


class Subscriber:
    """One WebSocket client: a bounded queue on the event loop that serves it.

    `offer` may be called from any thread (the listener thread, or the loop itself): the frame is
    handed to the loop with `call_soon_threadsafe`, which keeps frames in offer order. `next()` is
    awaited by the connection's sender task and returns None once the subscriber is stopped or dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_pending: int = 1000, name: str = "ws"):
        self.name = name
        self._loop = loop
        self._q: asyncio.Queue[dict | None] = asyncio.Queue(maxsize=max_pending + 1)  # +1: room for the stop marker
        self._max = max_pending
        self.dropped = threading.Event()

    def offer(self, f: dict) -> bool:
        if self.dropped.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._put, f)
        except RuntimeError:  # the loop is closed: the connection is gone
            self.dropped.set()
            return False
        return True

    def _put(self, f: dict | None) -> None:
        """Runs on the loop. None wakes the sender so it sees `dropped` and ends."""
        if f is not None and self.dropped.is_set():
            return
        if f is not None and self._q.qsize() >= self._max:
            log.warning("dropping WebSocket client %s: %d frames behind", self.name, self._max)
            self.dropped.set()
            f = None
        if not self._q.full():
            self._q.put_nowait(f)

    async def next(self) -> dict | None:
        """The next frame to send, or None once the subscriber is stopped or dropped."""
        if self.dropped.is_set():
            return None
        f = await self._q.get()
        return None if self.dropped.is_set() else f

    def stop(self) -> None:
        self.dropped.set()
        try:
            self._loop.call_soon_threadsafe(self._put, None)
        except RuntimeError:
            pass


LISTENER_TTL = 30.0     # seconds a registration lasts if this process dies without unregistering
RENEW_EVERY = 10.0      # seconds between renewals while the hub has subscribers


class EventHub:
    """LISTENs on aibot_events, broadcasts frames, and sends `stats` every `stats_interval` seconds.

    The job triggers send events only while some hub has a subscriber (`inspection.register_listener`):
    this hub registers when its first subscriber arrives, before that subscriber's snapshot is read, and
    unregisters when the last one leaves."""

    def __init__(self, database_url: str, database: db.Database, *, stats_interval: float = 3.0, poll: float = 0.25):
        self._url = database_url
        self._database = database
        self.stats_interval = stats_interval
        self.poll = poll
        self.listener = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._subs: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._registration_lock = threading.Lock()
        self.registered = False
        self._stop = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aibot-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            subs, self._subs = list(self._subs), set()
        for s in subs:
            s.stop()
        self._sync_registration()

    def subscribe(self, sub: Subscriber) -> None:
        """Adds `sub`; the first subscriber registers the hub (a database write: call it off the event loop)."""
        with self._lock:
            self._subs.add(sub)
        self._sync_registration()

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)
        sub.stop()
        self._sync_registration()

    def _sync_registration(self, *, renew: bool = False) -> None:
        """Registered while the hub has subscribers, not registered otherwise. A failure is logged and
        mended at the next renewal (the subscribers meanwhile miss job events, not snapshots or stats)."""
        with self._registration_lock:
            want = self.subscriber_count > 0
            if want == self.registered and not (want and renew):
                return
            try:
                with self._database.transaction() as conn:
                    if want:
                        inspection.register_listener(conn, self.listener, LISTENER_TTL)
                    else:
                        inspection.unregister_listener(conn, self.listener)
                self.registered = want
            except psycopg.Error as exc:
                log.warning("could not %s the live-events listener (%s: %s); retrying in %.0fs",
                            "register" if want else "unregister", type(exc).__name__, exc, RENEW_EVERY)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)

    def broadcast(self, f: dict) -> None:
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            if not s.offer(f):
                self.unsubscribe(s)

    def broadcast_snapshot(self) -> None:
        with self._database.transaction() as conn:
            data = snapshot_data(conn)
        self.broadcast(frame("snapshot", data))

    def _run(self) -> None:
        backoff = 0.5
        missed = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, application_name="aibot-serve-events") as conn:
                    inspection.listen(conn)
                    self.listening.set()
                    backoff = 0.5
                    if missed and self.subscriber_count:
                        self.broadcast_snapshot()
                    self._loop(conn)
            except psycopg.Error as exc:
                self.listening.clear()
                missed = True
                log.warning("event listener lost its database connection (%s); retrying in %.1fs",
                            type(exc).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                self.listening.clear()
                missed = True
                log.exception("event listener failed; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self.listening.clear()

    def _loop(self, conn: psycopg.Connection) -> None:
        next_stats = time.monotonic() + self.stats_interval
        next_renewal = time.monotonic() + RENEW_EVERY
        while not self._stop.is_set():
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + RENEW_EVERY
                self._sync_registration(renew=True)
            payloads = [n.payload for n in conn.notifies(timeout=self.poll, stop_after=500)]
            if payloads and self.subscriber_count:
                events = parse_events(payloads)
                ids = queued_ids(events)
                items = {}
                if ids:
                    with self._database.transaction() as c:
                        items = {row["id"]: row for row in inspection.queue_items_by_ids(c, ids)}
                for f in frames_for(events, items):
                    self.broadcast(f)
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.stats_interval
                if self.subscriber_count:
                    with self._database.transaction() as c:
                        stats = inspection.monitor_stats(c)
                    self.broadcast(frame("stats", stats))
