"""Claim + complete throughput of the Postgres job queue, with N threads against a real server.

    python bench/claim_throughput.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database on that server (dropped at the end, even on error), migrates it, and runs:
  single        claim() + complete() per job, plain priority claim
  batched       claim_batch(limit=B) + complete_many() per batch
  single-slots  claim(use_slots=True) + complete(), with S slots over two servers (capacity-aware path)
Prints a table and writes bench/results/claim_throughput.json. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from aibot import db
from aibot.db import migrate
from aibot.queue import jobs
from aibot.settings import redact_url

RESULTS = Path(__file__).resolve().parent / "results" / "claim_throughput.json"


class Progress:
    """A ticker thread printing how far the current scenario is, so a slow run is visibly alive."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"\r[{self.label:>12}] {self.done:>7}/{self.total} jobs  {rate:8.0f}/s  {elapsed:6.1f}s"

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            print(self._line(), end="", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        print(self._line(), file=sys.stderr, flush=True)


def enqueue(url: str, source: str, n: int) -> None:
    with db.connect(url, autocommit=True) as conn:
        for start in range(0, n, 1000):
            jobs.enqueue_many(conn, [
                jobs.NewJob(source=source, source_message_id=str(i), entity_id="bench", model="bench-model",
                            priority=i % 100, payload={"i": i})
                for i in range(start, min(n, start + 1000))])


def add_slots(url: str, n: int) -> None:
    # Bench fixture: stands in for what aibot.cluster.slots' rebalancer maintains.
    with db.connect(url, autocommit=True) as conn:
        for name, count in (("bench-a", n // 2), ("bench-b", n - n // 2)):
            sid = conn.execute("INSERT INTO aibot.servers (name, url, health) VALUES (%s, %s, 'healthy') RETURNING id",
                               (name, f"http://127.0.0.1/{name}")).fetchone()["id"]
            conn.execute("INSERT INTO aibot.slots (server_id, model) "
                         "SELECT %s, 'bench-model' FROM generate_series(1, %s)", (sid, count))


def run_scenario(url: str, label: str, n_jobs: int, threads: int, batch: int, use_slots: bool) -> dict:
    enqueue(url, label, n_jobs)
    latencies: list[float] = []
    lat_lock = threading.Lock()

    def worker(i: int, progress: Progress) -> int:
        count, mine = 0, []
        with db.connect(url, autocommit=True) as conn:
            while True:
                t0 = time.perf_counter()
                if batch == 1:
                    c = jobs.claim(conn, f"{label}-{i}", lease_seconds=60, use_slots=use_slots)
                    got = [c] if c else []
                else:
                    got = jobs.claim_batch(conn, f"{label}-{i}", batch, lease_seconds=60, use_slots=use_slots)
                if not got:
                    if progress.done >= n_jobs:
                        break
                    continue  # slots busy or rows locked by others: try again
                if len(got) == 1:
                    ok = jobs.complete(conn, got[0].job_id, got[0].token)
                    assert ok, f"lost job {got[0].job_id}"
                else:
                    ok_ids = jobs.complete_many(conn, got)
                    assert len(ok_ids) == len(got), "lost jobs in a batch"
                mine.append((time.perf_counter() - t0) / len(got))
                count += len(got)
                progress.add(len(got))
        with lat_lock:
            latencies.extend(mine)
        return count

    with Progress(label, n_jobs) as progress:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            counts = list(pool.map(lambda i: worker(i, progress), range(threads)))
        elapsed = time.perf_counter() - t0
    total = sum(counts)
    if total != n_jobs:
        raise RuntimeError(f"{label}: processed {total} of {n_jobs} jobs")
    lat_ms = sorted(x * 1000 for x in latencies)
    return {
        "scenario": label, "jobs": total, "threads": threads, "batch": batch, "use_slots": use_slots,
        "seconds": round(elapsed, 3), "jobs_per_second": round(total / elapsed, 1),
        "ms_per_job_p50": round(statistics.median(lat_ms), 3),
        "ms_per_job_p99": round(lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("AIBOT_DATABASE_URL"),
                   help="server to create the scratch database on (default: AIBOT_DATABASE_URL)")
    p.add_argument("--jobs", type=int, default=10000, help="jobs per scenario")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--batch", type=int, default=10, help="claim_batch limit for the batched scenario")
    p.add_argument("--slots", type=int, default=8, help="slots for the slot-aware scenario")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.database_url:
        p.error("--database-url or AIBOT_DATABASE_URL is required")

    name = f"aibot_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(args.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(args.database_url, dbname=name)
    print(f"scratch database {name} on {redact_url(args.database_url)}", file=sys.stderr)
    try:
        migrate.migrate(url)
        add_slots(url, args.slots)
        results = [
            run_scenario(url, "single", args.jobs, args.threads, 1, False),
            run_scenario(url, "batched", args.jobs, args.threads, args.batch, False),
            run_scenario(url, "single-slots", args.jobs, args.threads, 1, True),
        ]
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    print(f"\n{'scenario':<14}{'jobs':>8}{'thr':>5}{'batch':>6}{'seconds':>9}{'jobs/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for r in results:
        print(f"{r['scenario']:<14}{r['jobs']:>8}{r['threads']:>5}{r['batch']:>6}{r['seconds']:>9.2f}"
              f"{r['jobs_per_second']:>10.0f}{r['ms_per_job_p50']:>9.2f}{r['ms_per_job_p99']:>9.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "claim_throughput",
        "measured_at": datetime.now(timezone.utc).isoformat(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "slots": args.slots,
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
