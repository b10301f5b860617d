"""Benchmark 5, memory safety: aibot's peak memory vs a naive dispatcher's, on one 128 GB server.

    python bench/memory_safety.py [--window 60]

Two scenarios from the seed (docs: lm-studio-parallel-processing.md):
- "B": 20 workers next to six 15 GB models (preloaded). The seed's arithmetic: 90 GB of models +
  20 × 3 GB request buffers + 8 GB system = 158 GB on a 128 GB machine;
- "8 models": eight 15 GB models requested on 128 GB, starting cold (nothing loaded): 120 GB of models
  leaves no room for the buffers of 20 requests.

Each runs twice, on fresh simulators, with the same messages (round-robin over the models):
- aibot: `dramatiq aibot.actors --threads 20` (20 workers) with its scheduler; slots from the seed's
  sizing formula, the single-flight loader for cold models;
- naive: 20 threads firing chat requests at the server in FIFO order, relying on JIT loading, retrying
  a refused request (the seed's "Option 1: spawn N workers").

Memory is the simulator's accounting: resident models (loading ones included) + 3 GB per generating
request; its `peak_bytes` is exact (updated on every change). "peak + system" adds the seed's 8 GB OS
reserve, which the simulator does not model. aibot must never exceed the budget; the naive one does.
A run ends when every message is answered or after `--window` seconds (aibot does not load an 8th
model before the resident ones have served their minimum residency, 120 s, by design).
"""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import GB, log  # noqa: E402

NAME = "memory_safety"
BUDGET_GB = 128
SYSTEM_GB = 8
WORKERS = 20


def spec_for(models: int, preload: bool, speed: float):
    from aibot.sim.cluster import seed_spec

    return seed_spec(servers=1, memory_gb=BUDGET_GB, models=models, model_gb=15, parallel=(4,), speed=speed,
                     preload="all" if preload else None, per_request_bytes=3 * GB)


def messages(models: int, per_model: int) -> list[tuple[str, int]]:
    """(entity number, sequence) in round-robin order."""
    return [(i % models + 1, i) for i in range(models * per_model)]


def run_aibot(admin_url: str, models: int, preload: bool, per_model: int, speed: float, window: float,
              keep_logs: bool) -> dict:
    ents = [common.bench_entity(f"e{i}", f"sim/model-{i}@f16") for i in range(1, models + 1)]
    with common.scratch_database(admin_url, "mem") as url, \
            common.deployment(url, spec_for(models, preload, speed), ents, keep_logs=keep_logs) as d:
        sim = d.sims.servers[0]
        d.sync_cluster()
        d.start_scheduler()
        d.start_workers(processes=1, threads=WORKERS)
        msgs = [d.message(f"e{e}")[1] for e, _ in messages(models, per_model)]
        sim.reset_stats()
        with common.MemorySampler([sim]) as sampler:
            t0 = common.now()
            d.ingest(msgs)
            keys = {m["id"] for m in msgs}
            with common.Ticker("aibot", lambda: f"{len(keys & set(d.chat.arrivals()))}/{len(keys)} replies, "
                                                f"{sim.engine.stats()['memory']['used_bytes'] / GB:.0f} GB used"):
                try:
                    common.wait_until(lambda: keys <= set(d.chat.arrivals()), window, "replies", 0.05)
                except TimeoutError:
                    pass
            elapsed = common.now() - t0
        replies = len(keys & set(d.chat.arrivals()))
        slots = sum(d.slots().values())
        return summarise("aibot", sim.stats(), sampler, replies, len(msgs), elapsed, {"slots_at_end": slots})


def run_naive(models: int, preload: bool, per_model: int, speed: float, window: float) -> dict:
    from aibot.sim import SimCluster

    with SimCluster(spec_for(models, preload, speed)) as sims:
        sim = sims.servers[0]
        todo = collections.deque((f"sim/model-{e}@f16", common.key_of(i)) for e, i in messages(models, per_model))
        lock = threading.Lock()
        done = [0]
        errors = collections.Counter()
        stop = threading.Event()

        def worker() -> None:
            client = common.NaiveClient(sim.url)
            try:
                while not stop.is_set():
                    with lock:
                        if not todo:
                            return
                        model, key = todo.popleft()
                    status = client.chat(model, key)
                    with lock:
                        if status == 200:
                            done[0] += 1
                        else:
                            errors[status] += 1
                            todo.append((model, key))     # retry later, as a naive worker loop would
                    if status != 200:
                        stop.wait(0.05)
            finally:
                client.close()

        total = len(todo)
        with common.MemorySampler([sim]) as sampler:
            t0 = common.now()
            threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
            for t in threads:
                t.start()
            with common.Ticker("naive", lambda: f"{done[0]}/{total} replies, "
                                                f"{sim.engine.stats()['memory']['used_bytes'] / GB:.0f} GB used"):
                _join(threads, window, stop)
            elapsed = common.now() - t0
        return summarise("naive", sim.stats(), sampler, done[0], total, elapsed,
                         {"http_errors": {str(k): v for k, v in errors.items()}})


def _join(threads: list[threading.Thread], window: float, stop: threading.Event) -> None:
    try:
        common.wait_until(lambda: not any(t.is_alive() for t in threads), window, "naive workers", 0.05)
    except TimeoutError:
        stop.set()
        for t in threads:
            t.join(60)


def summarise(who: str, stats: dict, sampler: common.MemorySampler, replies: int, total: int, elapsed: float,
              extra: dict) -> dict:
    mem = stats["memory"]
    peak = mem["peak_bytes"]
    models = stats["models"].values()
    return {"dispatcher": who, "peak_gb": round(peak / GB, 1), "budget_gb": round(mem["budget_bytes"] / GB, 1),
            "peak_plus_system_gb": round(peak / GB + SYSTEM_GB, 1), "exceeded": peak > mem["budget_bytes"],
            "peak_generating": stats["server"]["peak_in_flight"], "replies": replies, "messages": total,
            "seconds": round(elapsed, 1), "loads": sum(m["loads"] for m in models),
            "load_refusals": mem["refusals"], "failed_generations": sum(m["failed"] for m in models),
            **extra, "memory_curve": [[round(t, 2), round(v[next(iter(v))] / GB, 1)] for t, v in sampler.samples]}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--speed", type=float, default=0.05,
                   help="simulator speed (0.05: 0.15 s replies, 1.5 s cold loads of 15 GB)")
    p.add_argument("--per-model", type=int, default=20, help="messages per model")
    p.add_argument("--window", type=float, default=60.0, help="seconds a run may take at most")
    p.add_argument("--quick", action="store_true", help="8 messages per model, 20 s window")
    args = p.parse_args(argv)
    if args.quick:
        args.per_model, args.window = min(args.per_model, 8), min(args.window, 20.0)
    if args.per_model < 1 or args.window <= 0 or args.speed <= 0:
        p.error("--per-model, --window and --speed must be positive")

    scenarios = [("B: 20 workers, 6 models (preloaded)", 6, True), ("8 models (cold)", 8, False)]
    rows = []
    for label, models, preload in scenarios:
        log(f"scenario {label}")
        for runner in ("aibot", "naive"):
            if runner == "aibot":
                r = run_aibot(args.database_url, models, preload, args.per_model, args.speed, args.window,
                              args.keep_logs)
            else:
                r = run_naive(models, preload, args.per_model, args.speed, args.window)
            r["scenario"] = label
            rows.append(r)
            log(f"  {runner}: peak {r['peak_gb']} GB of {r['budget_gb']} GB, {r['replies']}/{r['messages']} replies")

    cols = ["scenario", "dispatcher", "peak_gb", "budget_gb", "peak_plus_system_gb", "exceeded", "peak_generating",
            "replies", "messages", "seconds", "loads", "load_refusals"]
    print(common.table(rows, cols, title=f"Memory safety on one {BUDGET_GB} GB server, {WORKERS} workers "
                                         f"(peak = models + 3 GB per generating request, at the simulator)"))
    aibot_safe = all(not r["exceeded"] for r in rows if r["dispatcher"] == "aibot")
    naive_exceeds = all(r["exceeded"] for r in rows if r["dispatcher"] == "naive")
    print(f"target: aibot never exceeds the budget: {common.verdict(aibot_safe)}; "
          f"the naive dispatcher does: {'yes' if naive_exceeds else 'no'}")
    common.write_json(args.output_dir, NAME, {
        "definitions": {"peak_gb": "simulator peak: resident (and loading) models + 3 GB per generating request",
                        "peak_plus_system_gb": "peak + the seed's 8 GB system reserve (not modelled by the simulator)",
                        "naive": f"{WORKERS} threads, FIFO, JIT loading, refused requests retried after 50 ms"},
        "parameters": {"speed": args.speed, "per_model": args.per_model, "window_s": args.window,
                       "workers": WORKERS, "budget_gb": BUDGET_GB},
        "target": {"aibot_never_exceeds": True, "met": aibot_safe, "naive_exceeds": naive_exceeds},
        "results": rows,
    })
    if not args.no_plot:
        common.save_plot(args.output_dir, NAME, lambda fig: plot(fig, rows, scenarios), size=(12, 5))
    return 0


def plot(fig, rows: list[dict], scenarios) -> None:
    for i, (label, _, _) in enumerate(scenarios):
        ax = fig.add_subplot(1, len(scenarios), i + 1)
        for r in rows:
            if r["scenario"] == label:
                curve = r["memory_curve"]
                ax.plot([c[0] for c in curve], [c[1] for c in curve],
                        label=f"{r['dispatcher']} (peak {r['peak_gb']:.0f} GB)")
        ax.axhline(BUDGET_GB, color="red", linestyle="--", label=f"budget {BUDGET_GB} GB")
        ax.set_title(label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("accounted memory at the server (GB)")
        ax.legend(loc="lower right")


if __name__ == "__main__":
    sys.exit(main())
