"""Where one claim's time goes, statement by statement, as the cluster grows.

    python bench/claim_profile.py [--database-url URL] [--servers 2,200] [--models 6] [--jobs 10000] [--claims 30]

Why: bench/scaling.py says how the whole claim grows; this says which statement inside
aibot.claim_jobs grows (docs/benchmarks-overhead.md, benchmark 9, finding 1). Per point, a scratch
database is built as scaling.py builds its points (bench/scaling.py: build_cluster, add_jobs), then
--claims claims run one after the other on one session (each completed, so its slot is free again)
with auto_explain logging every nested statement with ANALYZE; the table shows each statement's median execution time. ANALYZE's timing
overhead inflates every figure, so compare statements and points with each other, not with the
claim latency of scaling.py. Needs auto_explain (a Postgres with contrib; the embedded one has none).
Writes bench/results/claim_profile.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, scaling  # noqa: E402
from bench.common import log  # noqa: E402

from aibot import db  # noqa: E402
from aibot.queue import jobs  # noqa: E402

NAME = "claim_profile"
AUTO_EXPLAIN = ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_analyze = on",
                "SET auto_explain.log_format = 'json'", "SET client_min_messages = log")


def profile_point(base_url: str, *, servers: int, models: int, queued: int, claims: int) -> dict:
    times: dict[str, list[float]] = {}
    with common.scratch_database(base_url, NAME) as url:
        with db.connect(url, autocommit=True) as conn:
            scaling.build_cluster(conn, servers=servers, models=models, rows_per_pair=1)
            scaling.add_jobs(conn, queued, models=models, start_rank=1e9)
            scaling.analyze(conn)
        with db.connect(url, autocommit=True) as conn:
            logged: list[str] = []
            conn.add_notice_handler(lambda diag: logged.append(diag.message_primary or ""))
            for stmt in AUTO_EXPLAIN:
                conn.execute(stmt)
            for _ in range(claims):
                logged.clear()
                claim = jobs.claim(conn, "claim-profile", lease_seconds=60)
                if claim is None:
                    raise SystemExit("claim_profile: a claim found nothing; raise --jobs")
                claimed = list(logged)
                jobs.complete(conn, claim.job_id, claim.token)   # gives the slot back, as scaling.py does
                for message in claimed:
                    start = message.find("{")
                    if start < 0:
                        continue
                    doc = json.loads(message[start:])
                    query = " ".join(doc.get("Query Text", "").split())
                    if query.upper().startswith(("SET ", "LOAD ")):
                        continue
                    times.setdefault(query[:90], []).append(doc["Plan"]["Actual Total Time"])
            conn.execute("SET client_min_messages = notice")
    statements = [{"statement": q, "median_ms": round(statistics.median(t), 3), "calls": len(t)}
                  for q, t in times.items()]
    return {"servers": servers, "models": models, "slot_rows": servers * models, "queued": queued,
            "claims": claims, "statements": statements}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--servers", default="2,200", help="comma-separated server counts, one point each")
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--jobs", type=int, default=10_000, help="queued jobs per point")
    p.add_argument("--claims", type=int, default=30, help="claims profiled per point")
    args = p.parse_args(argv)
    servers = common.positive_ints(p, "--servers", args.servers)
    if args.models < 1 or args.claims < 1 or args.jobs < args.claims:
        p.error("--models and --claims must be >= 1 and --jobs >= --claims")
    points = []
    for n in servers:
        log(f"[profile] {n} servers × {args.models} models, {args.jobs:,} queued, {args.claims} claims")
        points.append(profile_point(args.database_url, servers=n, models=args.models, queued=args.jobs,
                                    claims=args.claims))
    rows = [{"servers": pt["servers"], "slot rows": pt["slot_rows"], "median ms": s["median_ms"],
             "calls": s["calls"], "statement": s["statement"][:70]} for pt in points for s in pt["statements"]]
    print(common.table(rows, list(rows[0]), title="claim_jobs, per statement (auto_explain ANALYZE)"))
    common.write_json(args.output_dir, NAME, {"parameters": {"servers": servers, "models": args.models,
                                                             "jobs": args.jobs, "claims": args.claims},
                                              "points": points})
    return 0


if __name__ == "__main__":
    sys.exit(main())
