"""What the jobs NOTIFY trigger (0005_inspection.sql) costs on the hot claim path.

    python bench/notify_overhead.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database (dropped at the end), migrates it, then for several rounds, alternating
the order, enqueues N jobs and times N sequential `aibot.queue.jobs.claim()` calls (and N `complete()` calls)
with the state trigger enabled and disabled. A separate connection LISTENs and drains the channel
throughout, as `aibot serve` does. Prints per-call medians and the with/without ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from aibot import db
from aibot.db import migrate
from aibot.db.queries import parse_query_file
from aibot.ops import inspection
from aibot.queue import jobs

Q = parse_query_file((Path(__file__).with_suffix(".sql")).read_text(), "bench/notify_overhead.sql")


class Listener:
    """Drains aibot_events like the serve process, counting notifications."""

    def __init__(self, url: str):
        self.count = 0
        self._stop = threading.Event()
        self._conn = psycopg.connect(url, autocommit=True)
        inspection.listen(self._conn)
        self._conn.execute("SET search_path = aibot")
        inspection.register_listener(self._conn, "bench-notify-overhead", 3600)   # 0014: else nothing is sent
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for _ in self._conn.notifies(timeout=0.2):
                self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def one_round(url: str, n: int, trigger: bool, tag: str) -> dict:
    with db.connect(url, autocommit=True) as conn:
        conn.execute(Q["bench_reset"])
        conn.execute(Q["bench_insert_off"])
        conn.execute(Q["bench_triggers_on" if trigger else "bench_triggers_off"])
        for start in range(0, n, 1000):
            jobs.enqueue_many(conn, [jobs.NewJob(source=tag, source_message_id=str(i), entity_id="bench",
                                                 model="bench-model", priority=i % 100)
                                     for i in range(start, min(n, start + 1000))])
        claims = []
        t0 = time.perf_counter()
        for _ in range(n):
            c = jobs.claim(conn, "bench", lease_seconds=60, use_slots=False)
            assert c is not None
            claims.append(c)
        t_claim = time.perf_counter() - t0
        t0 = time.perf_counter()
        for c in claims:
            assert jobs.complete(conn, c.job_id, c.token)
        t_complete = time.perf_counter() - t0
    return {"trigger": trigger, "claim_ms": 1000 * t_claim / n, "complete_ms": 1000 * t_complete / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("AIBOT_TEST_DATABASE_URL")
                   or os.environ.get("AIBOT_DATABASE_URL"), help="server to create the scratch database on")
    p.add_argument("--jobs", type=int, default=2000, help="claims per round (2000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per setting (5)")
    args = p.parse_args(argv)
    if not args.database_url:
        p.error("--database-url (or AIBOT_TEST_DATABASE_URL) is required")

    name = f"aibot_bench_notify_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(args.database_url, dbname=name)
    try:
        migrate.migrate(url)
        listener = Listener(url)
        results: list[dict] = []
        try:
            warm = min(args.jobs, 500)
            one_round(url, warm, True, "warmup")  # caches, plans; not counted
            deadline = time.monotonic() + 10
            while listener.count < 2 * warm and time.monotonic() < deadline:
                time.sleep(0.05)  # lets the listener drain the warm-up before counting starts
            listener_start = listener.count
            for r in range(args.rounds):
                for trigger in ((True, False) if r % 2 == 0 else (False, True)):
                    res = one_round(url, args.jobs, trigger, f"r{r}{int(trigger)}")
                    results.append(res)
                    print(f"round {r} trigger={'on ' if trigger else 'off'} claim {res['claim_ms']:.3f} ms  "
                          f"complete {res['complete_ms']:.3f} ms", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 10
            expected = 2 * args.jobs * args.rounds  # claimed + completed per job in every trigger-on round
            while listener.count - listener_start < expected and time.monotonic() < deadline:
                time.sleep(0.05)  # waits for the listener to drain; only affects the notify count
        finally:
            listener.close()
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def med(trigger: bool, key: str) -> float:
        return statistics.median(r[key] for r in results if r["trigger"] is trigger)

    def best(trigger: bool, key: str) -> float:
        # The least-disturbed round: on a shared machine the minimum is the steadiest estimate.
        return min(r[key] for r in results if r["trigger"] is trigger)

    summary = {
        "jobs_per_round": args.jobs, "rounds": args.rounds,
        "claim_ms_with_trigger": round(med(True, "claim_ms"), 4),
        "claim_ms_without_trigger": round(med(False, "claim_ms"), 4),
        "claim_ratio": round(med(True, "claim_ms") / med(False, "claim_ms"), 3),
        "complete_ms_with_trigger": round(med(True, "complete_ms"), 4),
        "complete_ms_without_trigger": round(med(False, "complete_ms"), 4),
        "complete_ratio": round(med(True, "complete_ms") / med(False, "complete_ms"), 3),
        "claim_ratio_best_rounds": round(best(True, "claim_ms") / best(False, "claim_ms"), 3),
        "complete_ratio_best_rounds": round(best(True, "complete_ms") / best(False, "complete_ms"), 3),
        "notifications_received": listener.count - listener_start,
        "notifications_expected": 2 * args.jobs * args.rounds,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
