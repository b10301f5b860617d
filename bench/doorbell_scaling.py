"""How the doorbell's decision grows with the queue: the cost of "how many wake-ups now?" (the
doorbell_wanted view that every ring reads: the bot's ingest, a worker leaving its loop, the
scheduler's tick) at 1k → 1M queued jobs, against the two statements it replaced, in the same run.

    python bench/doorbell_scaling.py [--database-url URL] [--max-jobs 1000000] [--reads 50]

Why: the bot rings once per ingested batch, so a ring that walks the backlog makes every chat
message wait for a scan of the queue exactly when the queue is deep. Three states at each depth
(the cluster of bench/scaling.py's base point: 2 servers × 6 models, one slot row each):

  free     every slot free: the count of claimable work (min(runnable jobs, free slots) per model)
  busy     every slot taken: nothing is claimable, so the ring asks whether work waits for a model
           no server holds (then one wake-up starts a demand load)
  unplaced as busy, plus 1k queued jobs of a model no server holds (the answer is yes)

"new" reads `SELECT matchable, wanted FROM aibot.doorbell_wanted` (migration 0012); "previous"
runs the queries it replaced (doorbell_matchable, then doorbell_unplaced_demand when nothing was
claimable; sql/queries/queue/doorbell.sql at b9856c4), both on one autocommit connection, --reads
times each after 5 warm-up reads (prepared statements), client side. Ratios within one run are the
result; absolute times move with the machine's load. Writes bench/results/doorbell_scaling.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from bench.scaling import add_jobs, analyze, build_cluster, queued, reset  # noqa: E402

from aibot import db  # noqa: E402

NAME = "doorbell_scaling"
NEW = "SELECT matchable, wanted FROM aibot.doorbell_wanted"
# The statements 0012 replaced, verbatim from sql/queries/queue/doorbell.sql at b9856c4 (schema-qualified).
PREVIOUS_MATCHABLE = """
WITH free AS (
    SELECT model, free AS n FROM aibot.model_free_slots
), demand AS (
    SELECT j.model, count(*) AS n
    FROM aibot.jobs j
    WHERE j.state = 'queued' AND j.available_at <= now() AND j.reply IS NULL
      AND j.model IN (SELECT model FROM free)
    GROUP BY j.model
)
SELECT coalesce((SELECT sum(least(f.n, d.n)) FROM free f JOIN demand d USING (model)), 0)::int
     + (SELECT count(*) FROM aibot.jobs WHERE state = 'queued' AND available_at <= now() AND reply IS NOT NULL)::int
       AS matchable"""
PREVIOUS_UNPLACED = """
SELECT EXISTS (
    SELECT 1 FROM aibot.jobs j
    WHERE j.state = 'queued' AND j.model IS NOT NULL AND j.available_at <= now() AND j.reply IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM aibot.model_instances mi JOIN aibot.usable_servers u ON u.id = mi.server_id
          WHERE mi.model = j.model AND mi.state IN ('loaded', 'loading'))
) AS waiting"""


def new_read(conn) -> tuple[int, int]:
    row = conn.execute(NEW).fetchone()
    return row["matchable"], row["wanted"]


def previous_read(conn) -> tuple[int, int]:
    matchable = conn.execute(PREVIOUS_MATCHABLE).fetchone()["matchable"]
    if matchable > 0:
        return matchable, matchable
    return 0, int(conn.execute(PREVIOUS_UNPLACED).fetchone()["waiting"])


def timed(conn, read, n: int) -> dict[str, Any]:
    for _ in range(5):
        answer = read(conn)
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        answer = read(conn)
        ms.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(common.percentile(ms, 90), 3),
            "answer": list(answer)}


def set_state(conn, state: str) -> None:
    conn.execute("UPDATE aibot.slots SET job_id = NULL")
    conn.execute("DELETE FROM aibot.jobs WHERE source = 'unplaced'")
    if state in ("busy", "unplaced"):
        # A slot is taken when it names a job (one slot per job); the lowest ids serve (the view reads
        # job_id only, and those jobs stay queued, a deeper backlog by twelve).
        conn.execute("""UPDATE aibot.slots sl SET job_id = t.job_id
                        FROM (SELECT id, row_number() OVER (ORDER BY id) AS k FROM aibot.slots) s
                        JOIN (SELECT id AS job_id, row_number() OVER (ORDER BY id) AS k
                              FROM aibot.jobs ORDER BY id LIMIT 100) t USING (k)
                        WHERE sl.id = s.id""")
    if state == "unplaced":
        add_jobs(conn, 1_000, models=1, model="model-nowhere", start_rank=2e9, tag="u")
        conn.execute("UPDATE aibot.jobs SET source = 'unplaced' WHERE model = 'model-nowhere'")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--max-jobs", type=int, default=1_000_000)
    p.add_argument("--reads", type=int, default=50, help="timed reads per statement and point")
    args = p.parse_args(argv)
    for name in ("max_jobs", "reads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    depths = [d for d in (1_000, 10_000, 100_000, 1_000_000) if d <= args.max_jobs] or [args.max_jobs]
    points = []
    with common.scratch_database(args.database_url, "doorbell") as url, db.connect(url, autocommit=True) as conn:
        reset(conn)
        build_cluster(conn, servers=2, models=6, rows_per_pair=1)
        for i, depth in enumerate(depths):
            have = queued(conn)
            t0 = time.perf_counter()
            add_jobs(conn, depth - have, models=6, start_rank=1e9 + have, tag=f"d{i}")
            analyze(conn)
            log(f"[{depth:,}] {depth - have:,} jobs inserted in {time.perf_counter() - t0:.1f}s")
            for state in ("free", "busy", "unplaced"):
                set_state(conn, state)
                analyze(conn)
                new, prev = timed(conn, new_read, args.reads), timed(conn, previous_read, args.reads)
                if new["answer"] != prev["answer"]:
                    raise SystemExit(f"the two reads disagree at {depth:,} queued, {state}: new {new['answer']}, "
                                     f"previous {prev['answer']}; fix the view before timing it")
                point = {"queued": depth, "state": state, "new": new, "previous": prev,
                         "ratio": round(prev["p50_ms"] / new["p50_ms"], 1) if new["p50_ms"] else None}
                points.append(point)
                log(f"[{depth:,}] {state}: new p50 {new['p50_ms']} ms, previous {prev['p50_ms']} ms "
                    f"(answer matchable, wanted = {new['answer']})")
    rows = [{"queued": f"{pt['queued']:,}", "state": pt["state"], "new p50 ms": pt["new"]["p50_ms"],
             "previous p50 ms": pt["previous"]["p50_ms"], "previous / new": pt["ratio"],
             "matchable, wanted": pt["new"]["answer"]} for pt in points]
    print(common.table(rows, list(rows[0].keys()), title="Doorbell decision vs queue depth"))
    common.write_json(args.output_dir, NAME, {
        "parameters": {"max_jobs": args.max_jobs, "reads": args.reads},
        "definitions": {"new": NEW, "previous": "doorbell_matchable, then doorbell_unplaced_demand when 0 (b9856c4)",
                        "time": "client-side p50 of one read on an autocommit connection after 5 warm-up reads"},
        "points": points})
    return 0


if __name__ == "__main__":
    sys.exit(main())
