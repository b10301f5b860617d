"""Logging where every line names the worker, job, entity, server and model it concerns.

The names travel in a contextvar, so code deep in a backend need not pass them around; a filter
copies them onto each record and the format prints them (or '-' when not set). Threads aibot does not
start (Dramatiq's consumers and workers, psycopg_pool's maintenance threads) begin with an empty
context, so a process also has defaults (`bind_process`, the worker name at boot) that every line of
every thread falls back to: an error from a library still names the process it happened in.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import sys
from collections.abc import Iterator

FIELDS = ("worker", "job", "entity", "server", "model")
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("aibot_log_context", default={})

FORMAT = ("%(asctime)s %(levelname)-5s [%(process)d] %(name)s "
          "worker=%(worker)s job=%(job)s entity=%(entity)s server=%(server)s model=%(model)s | %(message)s")


def default_worker_name(role: str = "worker") -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def context(**fields: object) -> Iterator[None]:
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


_process_defaults: dict[str, str] = {}


def bind_process(**fields: object) -> None:
    """Fields every thread of this process falls back to (the worker name, bound once at boot)."""
    _process_defaults.update({k: str(v) for k, v in fields.items() if v is not None})


def bind(**fields: object) -> None:
    """Sets fields for the rest of this thread's/task's context (e.g. the worker name at start-up)."""
    _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name) or _process_defaults.get(name, "-"))
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is emitted, as logging's own last-resort handler
    does: a handler holding the stream it saw at setup writes into a closed file once that stream is
    swapped (pytest's capture, a daemon redirecting its output) and every later line is lost."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup(level: str | int | None = None) -> None:
    """Installs aibot's handler on the root logger at `level` (the caller's settings: AIBOT_LOG_LEVEL)."""
    level = level or "INFO"
    if isinstance(level, str):
        level = level.upper()
    root = logging.getLogger()
    if any(getattr(h, "_aibot", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = _StderrHandler()
    handler._aibot = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "apscheduler.scheduler", "apscheduler.executors.default"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def adopt_handlers(level: str | int | None = None) -> None:
    """Puts the context fields on handlers someone else installed (Dramatiq's worker processes log
    through a pipe to the master); falls back to `setup(level)` when there are none."""
    root = logging.getLogger()
    if not root.handlers:
        setup(level)
        return
    for handler in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
            handler.setFormatter(logging.Formatter(FORMAT))
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
