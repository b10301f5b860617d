"""Where Postgres spends its time on the claim path, per SQL function, with the claim's plans as migrated
and with plpgsql's default plan choice (migration 0015 undone).

    python bench/claim_functions.py [--database-url URL] [--jobs 3000] [--rounds 3]

Why: bench/overhead.py reports Postgres CPU per job but not which statement spends it, and the server has
no pg_stat_statements. `track_functions = all` makes Postgres time every SQL function and trigger call
(pg_stat_user_functions: calls, total and self time). One session claims and completes `--jobs` jobs one
after another (`jobs.claim` with slots, then the fused completion into `replies`, the worker's calls), one
model on 16 slots, so nothing else runs in the database. Each round runs both variants, alternating, each
on its own scratch database: "as migrated" and "custom plans", where `claim_jobs` gets
`RESET plan_cache_mode`, so plpgsql decides per statement between a custom plan (planned on every call)
and a generic one, as it did before 0015. Writes bench/results/claim_functions.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402

from aibot import db  # noqa: E402
from aibot.queue import jobs  # noqa: E402
from tests.support.cluster_rows import job, server, slots  # noqa: E402

CLAIM_SIGNATURE = "aibot.claim_jobs(text, double precision, boolean, integer, integer)"
VARIANTS = ("as migrated", "custom plans")


def one(admin_url: str, n: int, variant: str) -> dict:
    with common.scratch_database(admin_url, "claimfn") as url:
        with db.connect(url, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {conn.info.dbname} SET track_functions = 'all'")
            if variant == "custom plans":
                conn.execute(f"ALTER FUNCTION {CLAIM_SIGNATURE} RESET plan_cache_mode")
            sid = server(conn, "s")
            slots(conn, sid, "m1", 16)
            jobs.enqueue_many(conn, [job(str(i)) for i in range(n)])
        with db.connect(url, autocommit=True) as conn:    # a new session: track_functions applies
            started = time.perf_counter()
            for _ in range(n):
                c = jobs.claim(conn, "bench", lease_seconds=60)
                jobs.finish_delivered_into_replies(
                    conn, c.job_id, c.token, {"text": "ok"}, started_at=None, generated_at=None,
                    row={"reply_id": f"r{c.job_id}", "reply_to": str(c.job_id), "entity_id": "e1",
                         "message": {"text": "ok"}})
            wall = time.perf_counter() - started
            conn.execute("SELECT pg_stat_force_next_flush()")
        with db.connect(url, autocommit=True) as conn:    # this session's function stats are flushed now
            funcs = {r["funcname"]: r for r in conn.execute(
                "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions")}
    per_call = {name: {"calls_per_job": r["calls"] / n, "ms_per_call": r["total_time"] / r["calls"],
                       "self_ms_per_call": r["self_time"] / r["calls"]} for name, r in funcs.items()}
    return {"variant": variant, "jobs": n, "client_ms_per_job": wall / n * 1000, "functions": per_call}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    runs = []
    for rnd in range(args.rounds):
        for variant in (VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]):
            r = one(args.database_url, args.jobs, variant)
            claim = r["functions"].get("claim_jobs", {})
            log(f"round {rnd + 1} {variant}: claim_jobs {claim.get('ms_per_call', 0):.3f} ms per call, "
                f"claim + completion {r['client_ms_per_job']:.3f} ms per job (client wall)")
            runs.append({"round": rnd + 1, **r})
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        names = sorted({f for r in mine for f in r["functions"]})
        for name in names:
            rows.append({"variant": variant, "function": name,
                         "calls_per_job": statistics.median(r["functions"][name]["calls_per_job"] for r in mine),
                         "ms_per_call": statistics.median(r["functions"][name]["ms_per_call"] for r in mine)})
        rows.append({"variant": variant, "function": "(claim + completion, client wall per job)",
                     "calls_per_job": None, "ms_per_call": statistics.median(r["client_ms_per_job"] for r in mine)})
    print(common.table(rows, ["variant", "function", "calls_per_job", "ms_per_call"],
                       title=f"Postgres time per SQL function, medians of {args.rounds} rounds"))
    common.write_json(args.output_dir, "claim_functions", {"parameters": vars(args), "runs": runs, "medians": rows})


if __name__ == "__main__":
    main()
