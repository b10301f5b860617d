"""Benchmark 6, load storm: 50 requests at once for a model that is not loaded. How many times does the
server load it?

    python bench/load_storm.py [--requests 50]

One 128 GB LM Studio server (simulated), a 15 GB model, nothing loaded, 3 GB per generating request.
- aibot: 50 messages for one entity queued at once; aibot's single-flight loader (a Postgres advisory
  lock per server and model) loads the model once, then the jobs flow through its slots.
- JIT race: 50 concurrent chat requests straight at the server with `jit_race=True` — LM Studio's bug
  (lmstudio-bug-tracker #1751) where concurrent JIT requests each load their own copy. Copies that do
  not fit the memory are refused, and their requests fail.
- JIT, no race (context): the same 50 requests at a server whose JIT loading waits for the one load
  in progress (what a fixed LM Studio does); aibot does not rely on it.

Counts are the simulator's: `loads` (instances that finished loading), `load_requests`,
`load_refusals` (memory refusals), failed requests, and the memory peak.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import GB, log  # noqa: E402

NAME = "load_storm"
MODEL = "sim/model-1@f16"
BUDGET_GB = 128


def spec(speed: float, jit_race: bool):
    from aibot.sim.cluster import seed_spec

    return seed_spec(servers=1, memory_gb=BUDGET_GB, models=2, model_gb=15, parallel=(4,), speed=speed,
                     per_request_bytes=3 * GB, jit_race=jit_race)


def run_aibot(admin_url: str, n: int, speed: float, timeout: float, keep_logs: bool) -> dict:
    ents = [common.bench_entity("e1", MODEL), common.bench_entity("e2", "sim/model-2@f16")]
    with common.scratch_database(admin_url, "storm") as url, \
            common.deployment(url, spec(speed, False), ents, keep_logs=keep_logs) as d:
        sim = d.sims.servers[0]
        d.sync_cluster()
        d.start_scheduler()
        d.start_workers(processes=1, threads=16)
        msgs = [d.message("e1")[1] for _ in range(n)]
        sim.reset_stats()
        t0 = common.now()
        d.ingest(msgs)
        arrivals = d.wait_replies([m["id"] for m in msgs], timeout, "aibot")
        elapsed = max(arrivals.values()) - t0
        loads = d.query("SELECT count(*)::int AS n, count(DISTINCT worker_id)::int AS loaders FROM aibot.model_loads "
                        "WHERE action = 'load' AND ok AND model = %s", (MODEL,))[0]
        return row("aibot", sim.stats(), n, len(arrivals), elapsed, min(arrivals.values()) - t0,
                   {"aibot_model_loads_rows": loads["n"]})


def run_direct(label: str, n: int, speed: float, jit_race: bool, timeout: float) -> dict:
    from aibot.sim import SimCluster

    with SimCluster(spec(speed, jit_race)) as sims:
        sim = sims.servers[0]
        statuses: list[int] = []
        done_at: list[float] = []
        lock = threading.Lock()
        gate = threading.Barrier(n)

        def fire(i: int) -> None:
            client = common.NaiveClient(sim.url, timeout=timeout)
            try:
                gate.wait()             # all 50 leave together: a storm, not a trickle
                status = client.chat(MODEL, common.key_of(i))
                with lock:
                    statuses.append(status)
                    done_at.append(common.now())
            finally:
                client.close()

        threads = [threading.Thread(target=fire, args=(i,), daemon=True) for i in range(n)]
        t0 = common.now()
        for t in threads:
            t.start()
        with common.Ticker(label, lambda: f"{len(statuses)}/{n} answered, "
                                          f"{sim.model_stats(MODEL)['loading_instances']} loading, "
                                          f"{sim.model_stats(MODEL)['loads']} loaded"):
            for t in threads:
                t.join(timeout)
        ok = sum(s == 200 for s in statuses)
        return row(label, sim.stats(), n, ok, max(done_at) - t0 if done_at else None, None,
                   {"http_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}})


def row(who: str, stats: dict, n: int, ok: int, elapsed: float | None, first: float | None, extra: dict) -> dict:
    m = stats["models"][MODEL]
    return {"dispatcher": who, "requests": n, "loads": m["loads"], "load_requests": m["load_requests"],
            "load_refusals": m["load_failures"], "answered": ok, "failed": n - ok,
            "peak_memory_gb": round(stats["memory"]["peak_bytes"] / GB, 1), "budget_gb": BUDGET_GB,
            "seconds": None if elapsed is None else round(elapsed, 2),
            "first_reply_s": None if first is None else round(first, 2), **extra}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--speed", type=float, default=0.1, help="simulator speed (0.1: a 15 GB load takes ≈3 s)")
    p.add_argument("--quick", action="store_true", help="20 requests")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 20)
    if args.requests < 1 or args.speed <= 0:
        p.error("--requests and --speed must be positive")
    timeout = 180.0
    rows = [run_direct("JIT race (direct)", args.requests, args.speed, True, timeout),
            run_direct("JIT, no race (direct)", args.requests, args.speed, False, timeout)]
    log("aibot: a cold model is loaded by the scheduler's rebalance tick (every 30 s by default) or by an "
        "idle worker's demand loader")
    rows.insert(0, run_aibot(args.database_url, args.requests, args.speed, timeout, args.keep_logs))
    print(common.table(rows, ["dispatcher", "requests", "loads", "load_requests", "load_refusals", "answered",
                              "failed", "peak_memory_gb", "seconds", "first_reply_s"],
                       title=f"Load storm: {args.requests} requests for one cold 15 GB model on a {BUDGET_GB} GB server"))
    aibot, race = rows[0], rows[1]
    met = aibot["loads"] == 1 and race["loads"] > 1
    print(f"target: aibot loads once ({aibot['loads']}), the JIT race loads N times ({race['loads']} copies, "
          f"{race['load_refusals']} refused): {common.verdict(met)}")
    common.write_json(args.output_dir, NAME, {
        "parameters": {"requests": args.requests, "speed": args.speed, "model_gb": 15, "budget_gb": BUDGET_GB},
        "target": {"aibot_loads": 1, "met": met}, "results": rows})
    if not args.no_plot:
        common.save_plot(args.output_dir, NAME, lambda fig: plot(fig, rows, args.requests), size=(9, 4.5))
    return 0


def plot(fig, rows: list[dict], n: int) -> None:
    ax = fig.add_subplot(1, 1, 1)
    names = [r["dispatcher"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["loads"] for r in rows], 0.4, label="model loads")
    ax.bar([x + 0.2 for x in xs], [r["failed"] for r in rows], 0.4, label="failed requests", color="tab:red")
    for x, r in zip(xs, rows):
        ax.annotate(str(r["loads"]), (x - 0.2, r["loads"]), ha="center", va="bottom")
        ax.annotate(str(r["failed"]), (x + 0.2, r["failed"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), names)
    ax.set_title(f"{n} concurrent requests for one cold model")
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())
