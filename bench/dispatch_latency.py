"""Benchmark 3, dispatch latency: how long from enqueueing a message until its request reaches an LLM
server, when slots are free?

    python bench/dispatch_latency.py [--jobs 400] [--rate 8]

Messages arrive one at a time at a steady rate (default 8/s), each through the bot's ingest path in its
own transaction — jobs and their doorbell commit together, the worker is woken by dramatiq-postgres'
LISTEN/NOTIFY, claims a slot and sends the request. The seed's cluster (12 slots) with short replies
(speed 0.1: ≈0.3 s) keeps on average ~2.4 requests in flight, so a slot is free for every arrival.

Latency = from the call that enqueues the message to the moment its chat request arrives at the
simulator (the simulator's handler runs once the request is read: "first byte" up to loopback
parsing). Also shown from the ingest call's return (the commit), which excludes the insert itself.
Target on this 2-core machine, quiet (issue 13): p50 ≤ 5 ms, p99 ≤ 20 ms.

`--stages` splits each message's latency where the time goes, from stamps the workers write
(`bench/stages/sitecustomize.py`, put on their PYTHONPATH; the same clock as the benchmark's):

  ingest     the enqueue call: rules, then jobs + cursor + doorbell in one transaction (bench side)
  wake-up    its commit → the claim-actor invocation that claimed it starts (NOTIFY, dramatiq-postgres'
             consumer claims the doorbell message, Dramatiq hands it to a worker thread)
  claim      invocation start → its claim returned the job (aibot.claim_jobs, one round trip)
  prepare    claim → the HTTP generation request starts (config, prompt, backend)
  http       request start → read by the simulator
Jobs taken by an invocation that was already running when they committed (its retry of an empty
claim, or a completion's claim) are counted apart, since no wake-up served them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "dispatch_latency"
MODELS = 6
TARGET_P50_MS, TARGET_P99_MS = 5.0, 20.0


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--rate", type=float, default=8.0, help="messages per second (steady)")
    p.add_argument("--speed", type=float, default=0.1, help="simulator speed (0.1: ≈0.3 s per reply)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="threads per process (default: the slot count)")
    p.add_argument("--quick", action="store_true", help="60 messages at 10/s")
    p.add_argument("--stages", action="store_true", help="split the latency into stages (worker stamps)")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.rate = min(args.jobs, 60), max(args.rate, 10.0)
    for name in ("jobs", "rate", "speed"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}: must be > 0, got {getattr(args, name)}")

    from aibot.harness.stack import AIBOT_ROOT
    from aibot.sim.cluster import seed_spec

    spec = seed_spec(speed=args.speed, preload="all")
    ents = [common.bench_entity(f"e{i}", f"sim/model-{i}@f16") for i in range(1, MODELS + 1)]
    stage_dir = tempfile.mkdtemp(prefix="aibot-stages-") if args.stages else None
    env = {"AIBOT_STAGE_TRACE": stage_dir,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent / "stages"), AIBOT_ROOT])} \
        if stage_dir else None
    with common.scratch_database(args.database_url, "lat") as url, \
            common.deployment(url, spec, ents, env=env, keep_logs=args.keep_logs) as d:
        slot_rows = d.sync_cluster()
        total = sum(slot_rows.values())
        d.start_scheduler()
        proc = d.start_workers(processes=args.processes, threads=args.threads or total)
        warm = [d.message(f"e{i}")[1] for i in range(1, MODELS + 1)]
        d.ingest(warm)
        d.wait_replies([m["id"] for m in warm], 60, "warm-up")
        d.wait_quiet()
        d.recorder.clear()

        msgs = [d.message(f"e{i % MODELS + 1}")[1] for i in range(args.jobs)]
        called: dict[str, float] = {}
        returned: dict[str, float] = {}
        start = common.now() + 0.2
        with common.Ticker("arrivals", lambda: f"{len(called)}/{args.jobs} enqueued, "
                                               f"{len(d.recorder.first_arrival())} at the servers"), \
                common.db.connect(url, autocommit=True) as conn:
            for i, m in enumerate(msgs):
                due = start + i / args.rate           # open-loop arrivals: a late one does not shift the rest
                delay = due - common.now()
                if delay > 0:
                    time.sleep(delay)
                called[m["id"]] = common.now()
                d.ingest([m], conn=conn)
                returned[m["id"]] = common.now()
        d.wait_replies(list(called), 120, "replies")
        arrivals = d.recorder.first_arrival()
        reqs = d.recorder.snapshot()
        d.stop_proc(proc)
        # Which doorbell woke each job is not recorded; the scheduler's periodic doorbell tick (5 s)
        # rescues any job whose wake-up was lost, so latencies near that period point at one.
        sched_log = next((pr.log() for pr in d.stack.procs if pr.name == "scheduler"), "")
        job_keys = {r["id"]: r["source_message_id"] for r in d.query(
            "SELECT id, source_message_id FROM aibot.jobs WHERE source_message_id = ANY(%s)", (list(called),))}

    lat = {k: (arrivals[k] - called[k]) * 1000 for k in called if k in arrivals}
    lat_commit = {k: (arrivals[k] - returned[k]) * 1000 for k in called if k in arrivals}
    values = sorted(lat.values())
    p50, p90, p99 = (common.percentile(values, q) for q in (50, 90, 99))
    c50, c99 = (common.percentile(lat_commit.values(), q) for q in (50, 99))
    ingest_ms = sorted((returned[k] - called[k]) * 1000 for k in called)
    peak = peak_in_flight(reqs)
    met = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
    slow = sorted(((v, k) for k, v in lat.items()), reverse=True)[:10]
    result = {"messages": args.jobs, "rate_per_s": args.rate, "slots": total, "peak_in_flight": peak,
              "p50_ms": round(p50, 2), "p90_ms": round(p90, 2), "p99_ms": round(p99, 2),
              "max_ms": round(values[-1], 2), "mean_ms": round(sum(values) / len(values), 2),
              "from_commit_p50_ms": round(c50, 2), "from_commit_p99_ms": round(c99, 2),
              "ingest_call_p50_ms": round(common.percentile(ingest_ms, 50), 2),
              "over_100ms": sum(v > 100 for v in values), "over_1s": sum(v > 1000 for v in values),
              "doorbell_ticks_that_rang": sched_log.count("doorbell(s) rung")}
    print(common.table([result], ["messages", "rate_per_s", "slots", "peak_in_flight", "p50_ms", "p90_ms",
                                  "p99_ms", "max_ms", "from_commit_p50_ms", "from_commit_p99_ms",
                                  "over_100ms", "over_1s"],
                       title="Dispatch latency: enqueue call → request at the simulator (free slots)"))
    print(f"slowest: {', '.join(f'{k} {v:.0f} ms' for v, k in slow[:5])}")
    print(f"target: p50 ≤ {TARGET_P50_MS:.0f} ms and p99 ≤ {TARGET_P99_MS:.0f} ms: {common.verdict(met)} "
          f"(p50 {p50:.1f} ms, p99 {p99:.1f} ms)")
    stages = split_stages(stage_dir, job_keys, called, returned, arrivals) if stage_dir else None
    if stages:
        print(common.table([{"stage": k, **v} for k, v in stages["stages"].items()],
                           ["stage", "messages", "p50_ms", "p90_ms", "p99_ms"],
                           title="Where the time goes (per message; p50s do not add up exactly)"))
        print(f"served without a wake-up (an invocation already running): {stages['without_wakeup']}")
        for r in stages["slowest"][:5]:
            print("  slow: " + ", ".join(f"{k} {v:.1f} ms" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in r.items()))
    common.write_json(args.output_dir, NAME, {
        "definitions": {"latency": "ingest() call for one message (own transaction, doorbell included) -> "
                                   "its chat request read by the simulator",
                        "from_commit": "the same, from ingest()'s return (after the commit)"},
        "parameters": {"jobs": args.jobs, "rate": args.rate, "speed": args.speed, "processes": args.processes,
                       "threads": args.threads or total},
        "target": {"p50_ms_max": TARGET_P50_MS, "p99_ms_max": TARGET_P99_MS, "met": met},
        "result": result, "slowest": [{"key": k, "ms": round(v, 1)} for v, k in slow],
        "latencies_ms": [round(lat[k], 2) for k in called if k in lat],
        **({"stages": stages} if stages else {}),
    })
    if not args.no_plot:
        common.save_plot(args.output_dir, NAME, lambda fig: plot(fig, [lat[k] for k in called if k in lat], result))
    return 0


def split_stages(stage_dir: str, job_keys: dict[int, str], called: dict[str, float], returned: dict[str, float],
                 arrivals: dict[str, float]) -> dict:
    """Per-message stage durations (ms) from the workers' stamps (see the module docstring)."""
    invocations: dict[tuple[str, str], list[float]] = {}
    claimed: dict[str, tuple[float, tuple[str, str]]] = {}
    request: dict[str, float] = {}
    for f in Path(stage_dir).glob("stages-*.log"):
        for line in f.read_text().splitlines():
            t, thread, event, job = line.split()
            where = (f.name, thread)
            if event == "invocation":
                invocations.setdefault(where, []).append(float(t))
            elif event in ("claimed", "request") and int(job) in job_keys:
                key = job_keys[int(job)]
                if event == "claimed":
                    claimed[key] = (float(t), where)
                else:
                    request.setdefault(key, float(t))
    series: dict[str, list[float]] = {s: [] for s in ("ingest", "wake-up", "claim", "prepare", "http")}
    without = 0
    per_message: list[dict] = []
    for key, t_call in called.items():
        row: dict = {"key": key, "ingest": (returned[key] - t_call) * 1000}
        if key in request and key in arrivals:
            row["http"] = (arrivals[key] - request[key]) * 1000
            row["total"] = (arrivals[key] - t_call) * 1000
        t_claim, where = claimed.get(key, (None, None))
        started = max((t for t in invocations.get(where, []) if t <= t_claim), default=None) if t_claim else None
        if t_claim is None:
            row["served"] = "taken by a completion"
        elif started is None or started < returned[key]:
            row["served"] = "by an invocation already running"
            row["commit to claim"] = (t_claim - returned[key]) * 1000
        else:
            row.update({"served": "after a wake-up", "wake-up": (started - returned[key]) * 1000,
                        "claim": (t_claim - started) * 1000})
            if key in request:
                row["prepare"] = (request[key] - t_claim) * 1000
        without += row["served"] != "after a wake-up"
        for stage in series:
            if stage in row:
                series[stage].append(row[stage])
        per_message.append(row)
    slowest = sorted((r for r in per_message if "total" in r), key=lambda r: -r["total"])[:10]

    def summary(v: list[float]) -> dict:
        v = sorted(v)
        return {"messages": len(v), **{f"p{q}_ms": round(common.percentile(v, q), 2) if v else None
                                       for q in (50, 90, 99)}}

    return {"stages": {k: summary(v) for k, v in series.items()}, "without_wakeup": without,
            "slowest": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in slowest]}


def peak_in_flight(reqs: list[common.SimRequest]) -> int:
    events = sorted([(r.arrived, 1) for r in reqs] + [(r.done, -1) for r in reqs if r.done is not None])
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def plot(fig, series: list[float], result: dict) -> None:
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.plot(range(len(series)), series, ".", markersize=3)
    ax1.set_yscale("log")
    ax1.axhline(TARGET_P50_MS, color="green", linestyle=":", label="p50 target")
    ax1.axhline(TARGET_P99_MS, color="red", linestyle=":", label="p99 target")
    ax1.set_xlabel("message #")
    ax1.set_ylabel("enqueue → request at server (ms, log)")
    ax1.legend()
    ax2 = fig.add_subplot(1, 2, 2)
    data = sorted(series)
    ax2.plot(data, [(i + 1) / len(data) for i in range(len(data))])
    ax2.set_xscale("log")
    ax2.axvline(result["p50_ms"], color="green", linestyle="--", label=f"p50 {result['p50_ms']:.1f} ms")
    ax2.axvline(result["p99_ms"], color="red", linestyle="--", label=f"p99 {result['p99_ms']:.1f} ms")
    ax2.set_xlabel("ms (log)")
    ax2.set_ylabel("fraction of messages")
    ax2.set_title("CDF")
    ax2.legend()
    fig.suptitle(f"Dispatch latency, {result['messages']} messages at {result['rate_per_s']:g}/s, free slots")


if __name__ == "__main__":
    sys.exit(main())
