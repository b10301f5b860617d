"""What bench/overhead.py and bench/real_inference.py add to bench/common.py: the bench-only named
queries (bench/baselines/bench.sql), server-side transaction counts per database, and waiting for a
queue to drain while failing fast when a process it depends on died.

Benchmarks on this shared 2-core machine are noisy, so results are reported as ratios between systems
measured in the same run; absolute times are recorded for context only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from aibot.db.queries import parse_query_file

QUERIES = parse_query_file((Path(__file__).with_name("bench.sql")).read_text(), "bench/baselines/bench.sql")


def q(conn: psycopg.Connection, name: str, params: dict | None = None) -> list[dict]:
    cur = conn.execute(QUERIES[name], params or {})
    return cur.fetchall() if cur.description else []


def q1(url: str, name: str, params: dict | None = None) -> dict:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return q(conn, name, params)[0]


class Counter:
    """One open connection polling one count query; counts its own polls, which are transactions too
    and are subtracted from the server-side commit count."""

    def __init__(self, url: str, name: str, params: dict | None = None):
        self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        self.name, self.params, self.polls = name, params or {}, 0

    def __call__(self) -> int:
        self.polls += 1
        return q(self.conn, self.name, self.params)[0]["n"]

    def close(self) -> None:
        self.conn.close()


def xact_counts(url: str) -> dict:
    return q1(url, "bench_xact_counts")


def xact_delta(before: dict, after: dict) -> dict:
    return {k: int(after[k]) - int(before[k]) for k in before}


def wait_drained(open_count: Callable[[], int], *, timeout: float, interval: float = 0.05,
                 problem: Callable[[], str | None] = lambda: None) -> float:
    """Polls until nothing is left open; returns the perf_counter time the empty queue was first seen.

    `problem` returns a message when a process the run depends on died, so a crashed worker fails
    the run at once instead of after `timeout`.
    """
    deadline = time.perf_counter() + timeout
    while True:
        left = open_count()
        if left == 0:
            return time.perf_counter()
        msg = problem()
        if msg:
            raise RuntimeError(msg)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"still {left} open after {timeout:.0f}s")
        time.sleep(interval)


def package_versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out
