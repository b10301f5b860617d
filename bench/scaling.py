"""How the claim's cost grows with the work: claim latency and claim+complete throughput as the queue
and the cluster grow, with the claim's plans checked at every point.

    python bench/scaling.py [--database-url URL] [--max-jobs 1000000] [--threads 4] [--latency-claims 300]
                            [--sweeps depth,servers,models,slots,cluster,blocked] [--quick]

Why: a dispatcher whose claim walks the backlog or the slot table gets slower exactly when it is needed
most (a deep queue, a big cluster). Each sweep varies one dimension from a small base point
(1k queued jobs, 2 servers, 6 models, 12 slot rows):

  depth    queued jobs 1k → 10k → 100k → 1M (bulk-inserted with generate_series, cumulative)
  servers  2 → 20 → 200 servers, 6 models, one slot row per (server, model): 12 → 1,200 rows
  models   6 → 50 → 200 models on 2 servers, one slot row per (server, model): 12 → 400 rows
  slots    12 → 240 → 2,400 slot rows on 2 servers × 6 models (1 → 200 rows per pair)
  cluster  200 servers × 12 slot rows (2,400), 200 models (12 per server), --max-jobs queued
  blocked  1k placeable jobs behind 0 → 10k → 100k older jobs for a model no server holds

At every point:
  plan     the claim is run 8 times with auto_explain logging its nested statements (the statement
           the queue executor sends and every statement inside aibot.claim_jobs, custom and generic
           plans alike); no Seq Scan of jobs or slots may appear. Without auto_explain (an embedded
           Postgres has no contrib) the candidate and slot-choice statements are read from the installed
           function (pg_proc.prosrc) and explained, custom and generic (bench.common.claim_plans).
  latency  --latency-claims sequential claims on one connection (jobs.claim with slots, the worker's
           call), each followed by jobs.complete; the claim call is timed (client side: BEGIN, the
           statement, COMMIT).
  jobs/s   --threads connections claiming and completing as fast as they can for a fixed number of
           jobs (≤ a fifth of the queue, so the depth stays near its nominal value).

Target (issue 13): claim p50 within 2 × of its 1k-job value at 1M queued jobs and at 200 servers.
Writes bench/results/scaling.json and scaling.png. The scratch database (aibot_bench_scaling_<pid>_<hex>)
is dropped at the end. The 1M point takes about a minute to insert on 2 cores; --max-jobs caps it.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402

from aibot import db  # noqa: E402
from aibot.queue import jobs  # noqa: E402

PLAN_TABLES = ("jobs", "slots")       # never scanned sequentially by a claim
SYNC_COMMIT = False                   # the worker's sessions commit asynchronously (aibot.db async_commit)


def connect(url: str):
    """A session like the worker's: autocommit, and (unless --sync-commit) no wait for the WAL flush at
    commit, so the figure is the claim's own cost and not the shared disk's fsync latency."""
    conn = db.connect(url, autocommit=True)
    if not SYNC_COMMIT:
        conn.execute("SET synchronous_commit = off")
    return conn
LEASE = 300.0
PAYLOAD = ('{"message": {"text": "hello there, how are you today?", "author": "someone", "channel": "general"},'
           ' "context": []}')


# ---------------------------------------------------------------------------------------------------
# state of one point
# ---------------------------------------------------------------------------------------------------

def reset(conn) -> None:
    conn.execute("TRUNCATE aibot.jobs, aibot.slots, aibot.model_instances, aibot.servers RESTART IDENTITY CASCADE")


def build_cluster(conn, *, servers: int, models: int, rows_per_pair: int, models_per_server: int | None = None) -> int:
    """Servers (healthy, usable), the models they hold and their slot rows; returns the slot row count.

    Server s holds models (s * k .. s * k + k - 1) mod `models`, k = models_per_server (default all)."""
    k = models if models_per_server is None else models_per_server
    conn.execute("""INSERT INTO aibot.servers (name, url, kind, health, memory_bytes)
                    SELECT 'srv-' || g, 'http://127.0.0.1:' || (20000 + g), 'openai', 'healthy', 192000000000
                    FROM generate_series(0, %(n)s - 1) g""", {"n": servers})
    conn.execute("""INSERT INTO aibot.model_instances (server_id, model, state, size_bytes, parallel)
                    SELECT DISTINCT s.id, 'model-' || (((s.id - 1) * %(k)s + i) %% %(m)s), 'loaded', 1, 1
                    FROM aibot.servers s, generate_series(0, %(k)s - 1) i""", {"k": k, "m": models})
    conn.execute("""INSERT INTO aibot.slots (server_id, model)
                    SELECT mi.server_id, mi.model FROM aibot.model_instances mi, generate_series(1, %(r)s)""",
                 {"r": rows_per_pair})
    return conn.execute("SELECT count(*) AS n FROM aibot.slots").fetchone()["n"]


def add_jobs(conn, n: int, *, models: int, model: str | None = None, start_rank: float = 0.0, tag: str = "q") -> None:
    """n queued jobs in one INSERT … SELECT generate_series, spread over the models (or all `model`).

    rank as the product computes it (epoch + priority × aging), with priorities 0..99, so the index is
    walked in the same interleaved order as a real backlog."""
    if n <= 0:
        return
    conn.execute("""
        INSERT INTO aibot.jobs (source, source_message_id, entity_id, model, priority, rank, payload)
        SELECT 'scaling', %(tag)s || g, 'entity-' || (g %% 8),
               coalesce(%(model)s, 'model-' || (g %% %(m)s)), g %% 100,
               %(r0)s + g * 0.001 + (g %% 100) * 30, %(payload)s::jsonb
        FROM generate_series(1, %(n)s) g""",
                 {"n": n, "m": models, "model": model, "r0": start_rank, "tag": f"{tag}-", "payload": PAYLOAD})


def analyze(conn) -> None:
    for t in ("jobs", "slots", "servers", "model_instances"):
        conn.execute(f"ANALYZE aibot.{t}")


def queued(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM aibot.jobs WHERE state = 'queued'").fetchone()["n"]


# ---------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------

def claim_once(conn, worker: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    c = jobs.claim(conn, worker, lease_seconds=LEASE, use_slots=True)
    return time.perf_counter() - t0, c


def measure_latency(url: str, n: int) -> dict[str, Any]:
    lat: list[float] = []
    empty = 0
    with connect(url) as conn:
        for _ in range(5):                                   # warm the connection and its prepared statements
            _, c = claim_once(conn, "scaling-warm")
            if c:
                jobs.complete(conn, c.job_id, c.token)
        for _ in range(n):
            dt, c = claim_once(conn, "scaling-lat")
            if c is None:
                empty += 1
                continue
            lat.append(dt)
            jobs.complete(conn, c.job_id, c.token)
    ms = [x * 1000 for x in lat]
    return {"claims": len(ms), "empty": empty,
            "p50_ms": round(statistics.median(ms), 3) if ms else None,
            "p90_ms": round(common.percentile(ms, 90), 3) if ms else None,
            "p99_ms": round(common.percentile(ms, 99), 3) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 3) if ms else None}


def measure_throughput(url: str, threads: int, total: int) -> dict[str, Any]:
    """`threads` connections claim + complete until `total` jobs are done; jobs/s over the wall time."""
    done = [0] * threads
    empty = [0] * threads
    left = [total]
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with connect(url) as conn:
                start.wait()
                while True:
                    with lock:
                        if left[0] <= 0:
                            return
                        left[0] -= 1
                    c = jobs.claim(conn, f"scaling-t{i}", lease_seconds=LEASE, use_slots=True)
                    if c is None:
                        empty[i] += 1
                        if empty[i] > 1000:
                            return
                        continue
                    jobs.complete(conn, c.job_id, c.token)
                    done[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            try:
                start.abort()
            except threading.BrokenBarrierError:
                pass

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    n = sum(done)
    return {"threads": threads, "jobs": n, "empty_claims": sum(empty), "seconds": round(wall, 3),
            "jobs_per_s": round(n / wall, 1) if wall > 0 else None}


def plan_point(url: str) -> dict[str, Any]:
    plans = common.claim_plans(url, claim=lambda conn: jobs.claim(conn, "scaling-plan", lease_seconds=LEASE,
                                                                   use_slots=True))
    with db.connect(url, autocommit=True) as conn:             # give back what the plan check claimed
        conn.execute("UPDATE aibot.jobs SET state = 'done', finished_at = now() "
                     "WHERE state = 'running' AND worker_id = 'scaling-plan'")
    return common.plan_verdict(plans, PLAN_TABLES)


def run_point(url: str, args, *, sweep: str, x: Any, label: str, cluster: dict[str, Any],
              claims: int | None = None, tp_jobs: int | None = None) -> dict[str, Any]:
    with db.connect(url, autocommit=True) as conn:
        depth = queued(conn)
        slots = conn.execute("SELECT count(*) AS n FROM aibot.slots").fetchone()["n"]
        servers = conn.execute("SELECT count(*) AS n FROM aibot.servers").fetchone()["n"]
        models = conn.execute("SELECT count(DISTINCT model) AS n FROM aibot.slots").fetchone()["n"]
    plan = plan_point(url)
    lat = measure_latency(url, claims or args.latency_claims)
    tp = measure_throughput(url, args.threads, max(50, min(tp_jobs or args.throughput_jobs, depth // 5)))
    point = {"sweep": sweep, "x": x, "label": label, "queued": depth, "servers": servers, "models": models,
             "slot_rows": slots, **cluster, "plan": plan, "latency": lat, "throughput": tp}
    log(f"[{sweep}] {label}: queued {depth:,} servers {servers} models {models} slots {slots}: "
        f"claim p50 {lat['p50_ms']} ms p99 {lat['p99_ms']} ms, {tp['jobs_per_s']} jobs/s, "
        f"plan {'ok' if plan['ok'] else 'SEQ SCAN: ' + ', '.join(plan['seq_scans'])}")
    return point


# ---------------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------------

def sweep_depth(url, args, base_jobs: int) -> list[dict]:
    out = []
    targets = [d for d in (1_000, 10_000, 100_000, 1_000_000) if d <= args.max_jobs]
    with db.connect(url, autocommit=True) as conn:
        reset(conn)
        build_cluster(conn, servers=2, models=6, rows_per_pair=1)
    inserted = 0
    for i, d in enumerate(targets):
        with db.connect(url, autocommit=True) as conn:
            have = queued(conn)
            t0 = time.perf_counter()
            add_jobs(conn, d - have, models=6, start_rank=1e9 + inserted, tag=f"d{i}")
            inserted += d - have
            analyze(conn)
            log(f"[depth] {d - have:,} jobs inserted in {time.perf_counter() - t0:.1f}s")
        out.append(run_point(url, args, sweep="depth", x=d, label=f"{d:,} queued", cluster={}))
    return out


def sweep_cluster_dim(url, args, sweep: str, values, make) -> list[dict]:
    out = []
    for v in values:
        with db.connect(url, autocommit=True) as conn:
            reset(conn)
            shape = make(conn, v)
            add_jobs(conn, base_jobs(args), models=shape["models"], start_rank=1e9)
            analyze(conn)
        out.append(run_point(url, args, sweep=sweep, x=v, label=f"{sweep}={v}", cluster={}))
    return out


def base_jobs(args) -> int:
    return min(10_000, args.max_jobs)


def sweep_blocked(url, args) -> list[dict]:
    out = []
    for ahead in [a for a in (0, 10_000, 100_000) if a <= args.max_jobs]:
        with db.connect(url, autocommit=True) as conn:
            reset(conn)
            build_cluster(conn, servers=2, models=6, rows_per_pair=1)
            add_jobs(conn, ahead, models=1, model="model-unplaced", start_rank=0.0, tag="blocked")
            add_jobs(conn, 1_000 + args.latency_claims + args.throughput_jobs, models=6, start_rank=1e9, tag="ok")
            analyze(conn)
        out.append(run_point(url, args, sweep="blocked", x=ahead, label=f"{ahead:,} unplaced ahead", cluster={}))
    return out


def sweep_big_cluster(url, args) -> list[dict]:
    with db.connect(url, autocommit=True) as conn:
        reset(conn)
        build_cluster(conn, servers=200, models=200, rows_per_pair=1, models_per_server=12)
        t0 = time.perf_counter()
        add_jobs(conn, args.max_jobs, models=200, start_rank=1e9)
        analyze(conn)
        log(f"[cluster] {args.max_jobs:,} jobs inserted in {time.perf_counter() - t0:.1f}s")
    return [run_point(url, args, sweep="cluster", x=args.max_jobs,
                      label=f"200 servers, 200 models, 2,400 slots, {args.max_jobs:,} queued", cluster={})]


SWEEPS = ("depth", "servers", "models", "slots", "cluster", "blocked")


def run(url: str, args) -> list[dict]:
    points: list[dict] = []
    for name in args.sweeps:
        t0 = time.perf_counter()
        if name == "depth":
            points += sweep_depth(url, args, base_jobs(args))
        elif name == "servers":
            points += sweep_cluster_dim(url, args, "servers", args.servers, lambda c, v: {
                "models": 6, "rows": build_cluster(c, servers=v, models=6, rows_per_pair=1)})
        elif name == "models":
            points += sweep_cluster_dim(url, args, "models", args.models, lambda c, v: {
                "models": v, "rows": build_cluster(c, servers=2, models=v, rows_per_pair=1)})
        elif name == "slots":
            points += sweep_cluster_dim(url, args, "slots", args.slots, lambda c, v: {
                "models": 6, "rows": build_cluster(c, servers=2, models=6, rows_per_pair=max(1, v // 12))})
        elif name == "cluster":
            points += sweep_big_cluster(url, args)
        elif name == "blocked":
            points += sweep_blocked(url, args)
        log(f"sweep {name}: {time.perf_counter() - t0:.1f}s")
    return points


# ---------------------------------------------------------------------------------------------------
# verdict, output
# ---------------------------------------------------------------------------------------------------

def ratio_to_first(points: list[dict], sweep: str) -> tuple[float | None, dict | None, dict | None]:
    ps = [p for p in points if p["sweep"] == sweep and p["latency"]["p50_ms"]]
    if len(ps) < 2:
        return None, None, None
    return round(ps[-1]["latency"]["p50_ms"] / ps[0]["latency"]["p50_ms"], 2), ps[0], ps[-1]


def target(points: list[dict]) -> dict[str, Any]:
    depth, d0, d1 = ratio_to_first(points, "depth")
    servers, s0, s1 = ratio_to_first(points, "servers")
    plans_ok = all(p["plan"]["ok"] for p in points)
    checks = {}
    if depth is not None:
        checks["depth"] = {"from": d0["queued"], "to": d1["queued"], "p50_ratio": depth, "met": depth <= 2.0}
    if servers is not None:
        checks["servers"] = {"from": s0["servers"], "to": s1["servers"], "p50_ratio": servers, "met": servers <= 2.0}
    met = plans_ok and bool(checks) and all(c["met"] for c in checks.values())
    full = bool(d1 and d1["queued"] >= 1_000_000 and s1 and s1["servers"] >= 200)
    return {"description": "claim p50 within 2x of its 1k-job value at 1M queued jobs and at 200 servers; "
                           "no Seq Scan of jobs or slots in any claim plan",
            "checks": checks, "plans_ok": plans_ok, "full_range": full,   # full: 1M jobs and 200 servers reached
            "met": met if checks else None}


def draw(points: list[dict]):
    def _draw(fig):
        sweeps = [s for s in SWEEPS if any(p["sweep"] == s for p in points)]
        xlabels = {"depth": "queued jobs", "servers": "servers", "models": "models", "slots": "slot rows",
                   "cluster": "queued jobs (200 servers, 200 models, 2,400 slots)",
                   "blocked": "unplaced jobs ahead of 1k placeable"}
        for i, s in enumerate(sweeps):
            ps = [p for p in points if p["sweep"] == s]
            xs = [p["x"] if s != "blocked" else max(p["x"], 1) for p in ps]
            ax = fig.add_subplot(2, len(sweeps), i + 1)
            ax.plot(xs, [p["latency"]["p50_ms"] for p in ps], "o-", label="p50")
            ax.plot(xs, [p["latency"]["p99_ms"] for p in ps], "s--", label="p99")
            ax.set_xscale("log")
            ax.set_title(s)
            ax.set_ylabel("claim latency (ms)")
            ax.set_ylim(bottom=0)
            for p, x in zip(ps, xs):
                if not p["plan"]["ok"]:
                    ax.annotate("seq scan", (x, p["latency"]["p50_ms"]), color="red", fontsize=7)
            ax.legend(fontsize=7)
            ax2 = fig.add_subplot(2, len(sweeps), len(sweeps) + i + 1)
            ax2.plot(xs, [p["throughput"]["jobs_per_s"] for p in ps], "o-", color="tab:green")
            ax2.set_xscale("log")
            ax2.set_xlabel(xlabels[s], fontsize=8)
            ax2.set_ylabel("claim+complete jobs/s")
            ax2.set_ylim(bottom=0)
        fig.suptitle(f"aibot claim scaling ({common.CODE_AT_START['commit']})")
    return _draw


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--max-jobs", type=int, default=1_000_000, help="deepest queue of the depth/cluster sweeps")
    p.add_argument("--threads", type=int, default=4, help="connections for the jobs/s measurement")
    p.add_argument("--latency-claims", type=int, default=300, help="sequential claims timed per point")
    p.add_argument("--throughput-jobs", type=int, default=1000, help="jobs claimed+completed for jobs/s per point")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {','.join(SWEEPS)}")
    p.add_argument("--servers", default="2,20,200")
    p.add_argument("--models", default="6,50,200")
    p.add_argument("--slots", default="12,240,2400")
    p.add_argument("--sync-commit", action="store_true",
                   help="measure with synchronous commits (default: asynchronous, as the worker commits)")
    p.add_argument("--quick", action="store_true", help="smoke pass: ≤ 10k jobs, small sweeps (not results)")
    args = p.parse_args(argv)
    global SYNC_COMMIT
    SYNC_COMMIT = args.sync_commit
    args.sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    bad = [s for s in args.sweeps if s not in SWEEPS]
    if bad:
        p.error(f"--sweeps: unknown {', '.join(bad)}; choose from {', '.join(SWEEPS)}")
    for name in ("servers", "models", "slots"):
        setattr(args, name, common.positive_ints(p, f"--{name}", getattr(args, name)))
    for name in ("max_jobs", "threads", "latency_claims", "throughput_jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.quick:
        args.max_jobs = min(args.max_jobs, 10_000)
        args.latency_claims = min(args.latency_claims, 50)
        args.throughput_jobs = min(args.throughput_jobs, 200)
        args.servers, args.models, args.slots = args.servers[:2], args.models[:2], args.slots[:2]

    t0 = time.perf_counter()
    with common.scratch_database(args.database_url, "scaling") as url:
        points = run(url, args)
    verdict = target(points)
    rows = [{"sweep": p["sweep"], "point": p["label"], "queued": p["queued"], "servers": p["servers"],
             "models": p["models"], "slot rows": p["slot_rows"], "claim p50 ms": p["latency"]["p50_ms"],
             "p99 ms": p["latency"]["p99_ms"], "jobs/s": p["throughput"]["jobs_per_s"],
             "plan": "ok" if p["plan"]["ok"] else "SEQ " + ",".join(p["plan"]["seq_scans"])} for p in points]
    print(common.table(rows, list(rows[0].keys()) if rows else [], title="Claim scaling"))
    for name, c in verdict["checks"].items():
        print(f"{name}: p50 ×{c['p50_ratio']} from {c['from']:,} to {c['to']:,} ({common.verdict(c['met'])})")
    print(f"plans: {'no Seq Scan of jobs or slots' if verdict['plans_ok'] else 'SEQ SCAN found'}")
    print(f"target: claim p50 within 2x at 1M jobs and 200 servers, plans without Seq Scan: "
          f"{common.verdict(verdict['met'])}" + ("" if verdict["full_range"] else " (not the full range)"))
    common.write_json(args.output_dir, "scaling", {
        "parameters": {k: v for k, v in vars(args).items() if k not in ("database_url", "output_dir")},
        "definitions": {"latency": "client-side time of jobs.claim(use_slots=True) on one connection, each "
                                   "followed by jobs.complete (BEGIN + statement + COMMIT), synchronous_commit off unless --sync-commit",
                        "jobs_per_s": "claim + complete cycles per second over --threads connections",
                        "plan": "auto_explain of every statement a claim runs (or EXPLAIN of the candidate and "
                                "slot-choice statements from pg_proc.prosrc); ok = no Seq Scan of jobs or slots"},
        "seconds": round(time.perf_counter() - t0, 1), "target": verdict, "points": points})
    if not args.no_plot:
        common.save_plot(args.output_dir, "scaling", draw(points), size=(4 * max(1, len(args.sweeps)), 7))
    return 0


if __name__ == "__main__":
    sys.exit(main())
