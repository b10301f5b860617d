"""Benchmark 7, swap thrash: more models than fit in memory, requests interleaved A B A C A B A C …
How many model loads per 1,000 replies, and how long does a request wait?

    python bench/swap_thrash.py [--duration 70] [--rate 1]

One 56 GB server, three 15 GB models (A, B, C). The seed's sizing fits two of them next to request
buffers (56 − 8 reserve − 4.8 safety − 30 = 13.2 GB → 4 slots); a third does not fit at all. A and B
start resident. Requests arrive one at a time at `--rate` per second in the pattern A B A C, for
`--duration` seconds; then the run may drain for `--drain` seconds.

- aibot: the real stack. Queued C jobs have no slot; an idle worker's demand loader (or the
  scheduler's rebalance tick) runs a demand pass (aibot.cluster.demand): C takes an idle resident's
  place when its queue is worth the load, and once its oldest job nears the aging time it wins a swap
  whatever is resident (a busy victim is drained first). The preloaded A and B are
  marked as resident for an hour before the run (steady state), so the first swap is possible at once.
- FIFO: a naive dispatcher with the same 4 slots and the same two-model limit: strict arrival order;
  when the head request's model is not resident it waits for the least recently used model to go
  idle, unloads it and loads the needed one (over the LM Studio REST API), holding up the queue.

Wait = enqueue → the request reaches the server. Requests still waiting when the run ends count with
the wait they had so far (a lower bound; the table says how many). Loads are the simulator's count.
Target: aibot ≥ 3× fewer loads per 1,000 replies than FIFO, every request dispatched, and p99 wait
(overall and B's) ≤ aging_seconds + the model's load time (the starvation bound of
aibot.cluster.demand: a model resident nowhere wins a swap once its oldest job has waited its aging).
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import GB, log  # noqa: E402

NAME = "swap_thrash"
MEMORY_GB = 56
PATTERN = ("sim/model-1@f16", "sim/model-2@f16", "sim/model-1@f16", "sim/model-3@f16")   # A B A C
LABEL = {"sim/model-1@f16": "A", "sim/model-2@f16": "B", "sim/model-3@f16": "C"}
AGING_SECONDS = 30.0


def spec(speed: float):
    from aibot.sim.cluster import seed_spec

    return seed_spec(servers=1, memory_gb=MEMORY_GB, models=3, model_gb=15, parallel=(4,), speed=speed,
                     preload=["sim/model-1@f16", "sim/model-2@f16"], per_request_bytes=3 * GB)


def capacity() -> tuple[int, int]:
    """(slots with two models resident, most models that fit with at least one slot) by aibot's sizing."""
    from aibot.cluster.sizing import Budget, Instance, server_slots

    budget = Budget(memory_bytes=MEMORY_GB * GB)
    fits, slots2 = 0, 0
    for k in range(1, 4):
        s = server_slots(budget, [Instance(f"m{i}", 15 * GB, 4) for i in range(k)]).slots
        if s >= 1:
            fits = k
        if k == 2:
            slots2 = s
    return slots2, fits


def schedule(rate: float, duration: float) -> list[tuple[float, str]]:
    n = max(1, int(rate * duration))
    return [(i / rate, PATTERN[i % len(PATTERN)]) for i in range(n)]


def run_aibot(admin_url: str, sched: list[tuple[float, str]], speed: float, drain: float, keep_logs: bool) -> dict:
    ents = [common.bench_entity(f"e{i}", f"sim/model-{i}@f16") for i in (1, 2, 3)]
    by_model = {f"sim/model-{i}@f16": f"e{i}" for i in (1, 2, 3)}
    with common.scratch_database(admin_url, "thrash") as url, \
            common.deployment(url, spec(speed), ents, keep_logs=keep_logs) as d:
        sim = d.sims.servers[0]
        d.sync_cluster()
        d.query("UPDATE aibot.model_instances SET loaded_at = now() - interval '1 hour', "
                "last_used_at = now() - interval '1 hour' RETURNING model")
        d.start_scheduler()
        d.start_workers(processes=1, threads=8)
        msgs = [(at, model, d.message(by_model[model])[1]) for at, model in sched]
        sim.reset_stats()
        called: dict[str, float] = {}
        t0 = common.now() + 0.2
        with common.Ticker("aibot", lambda: status(called, d.recorder.first_arrival(), sim)):
            _, models = d.replay(msgs, t0=t0, drain=drain, called=called)
        end = common.now()
        dispatched = d.recorder.first_arrival()
        row = summarise("aibot", sim.stats(), called, models, dispatched, d.chat.reply_count(), end, t0)
        row["load_s_max"] = round(float(d.scalar(
            "SELECT coalesce(max(extract(epoch FROM finished_at - started_at)), 0)::float8 FROM aibot.model_loads "
            "WHERE action = 'load' AND ok")), 2)
        return row


def lms_key(model: str) -> str:
    """LM Studio's key for a variant name: its REST API loads `sim/model-1`, not `sim/model-1@f16`
    (the simulator refuses the variant name as LM Studio does; aibot's identity rules do this mapping)."""
    return model.split("@", 1)[0]


class Fifo:
    """Strict arrival order, load-on-demand with LRU eviction, `slots` requests in flight at most."""

    def __init__(self, url: str, slots: int, max_resident: int, resident: list[str]):
        self.url, self.slots, self.max_resident = url, slots, max_resident
        self.cond = threading.Condition()
        self.queue: collections.deque[tuple[str, str]] = collections.deque()
        self.resident: collections.OrderedDict[str, float] = collections.OrderedDict((m, 0.0) for m in resident)
        self.inflight: collections.Counter[str] = collections.Counter()
        self.dispatched: dict[str, float] = {}
        self.replied: set[str] = set()
        self.swaps = 0
        self.stop = threading.Event()
        self.admin = common.NaiveClient(url)
        self.thread = threading.Thread(target=self._loop, daemon=True, name="fifo")

    def submit(self, key: str, model: str) -> None:
        with self.cond:
            self.queue.append((key, model))
            self.cond.notify_all()

    def _wait(self, pred) -> bool:
        with self.cond:
            while not pred():
                if self.stop.is_set():
                    return False
                self.cond.wait(0.1)
            return True

    def _loop(self) -> None:
        while self._wait(lambda: bool(self.queue)):
            key, model = self.queue[0]
            if not self._wait(lambda: sum(self.inflight.values()) < self.slots):
                return
            if model not in self.resident:
                if len(self.resident) >= self.max_resident:
                    victim = next(iter(self.resident))           # least recently used
                    if not self._wait(lambda: self.inflight[victim] == 0):
                        return
                    self.admin.post("/api/v1/models/unload", {"instance_id": lms_key(victim)})
                    with self.cond:
                        del self.resident[victim]
                status = self.admin.post("/api/v1/models/load", {"model": lms_key(model)})   # blocks for the load
                if status != 200:
                    raise RuntimeError(f"FIFO baseline: loading {model} answered HTTP {status}")
                self.swaps += 1
            with self.cond:
                self.queue.popleft()
                self.inflight[model] += 1
                self.resident[model] = common.now()
                self.resident.move_to_end(model)
                self.dispatched[key] = common.now()
            threading.Thread(target=self._generate, args=(key, model), daemon=True).start()

    def _generate(self, key: str, model: str) -> None:
        client = common.NaiveClient(self.url)
        try:
            status = client.chat(model, key)
        finally:
            client.close()
        with self.cond:
            self.inflight[model] -= 1
            if status == 200:
                self.replied.add(key)
            self.cond.notify_all()


def run_fifo(sched: list[tuple[float, str]], speed: float, drain: float, slots: int, max_resident: int) -> dict:
    from aibot.sim import SimCluster

    with SimCluster(spec(speed)) as sims:
        sim = sims.servers[0]
        fifo = Fifo(sim.url, slots, max_resident, ["sim/model-1@f16", "sim/model-2@f16"])
        fifo.thread.start()
        called: dict[str, float] = {}
        models: dict[str, str] = {}
        t0 = common.now() + 0.2
        with common.Ticker("FIFO", lambda: status(called, fifo.dispatched, sim)):
            for i, (at, model) in enumerate(sched):
                pause = t0 + at - common.now()
                if pause > 0:
                    time.sleep(pause)
                key = common.key_of(i)
                called[key] = common.now()
                models[key] = model
                fifo.submit(key, model)
            try:
                common.wait_until(lambda: len(fifo.replied) >= len(called), drain, "drain", 0.05)
            except TimeoutError:
                pass
        end = common.now()
        fifo.stop.set()
        fifo.thread.join(10)
        with fifo.cond:
            dispatched = dict(fifo.dispatched)
            replies = len(fifo.replied)
        fifo.admin.close()
        return summarise("FIFO", sim.stats(), called, models, dispatched, replies, end, t0)


def status(called: dict, dispatched: dict, sim) -> str:
    st = sim.stats()
    loaded = [LABEL.get(k, k) for k, m in st["models"].items() if m["loaded_instances"]]
    return (f"{len(called)} enqueued, {len(set(called) & set(dispatched))} dispatched, loads "
            f"{sum(m['loads'] for m in st['models'].values())}, resident {''.join(sorted(loaded))}")


def summarise(who: str, stats: dict, called: dict, models: dict, dispatched: dict, replies: int,
              end: float, t0: float) -> dict:
    waits, censored = [], 0
    per_model: dict[str, list[float]] = collections.defaultdict(list)
    timeline = []
    for key, at in called.items():
        if key in dispatched:
            w = dispatched[key] - at
        else:
            w, censored = end - at, censored + 1
        waits.append(w)
        per_model[LABEL[models[key]]].append(w)
        timeline.append([round(at - t0, 2), LABEL[models[key]], round(w, 2), key in dispatched])
    loads = sum(m["loads"] for m in stats["models"].values())
    return {"dispatcher": who, "requests": len(called), "replies": replies, "not_dispatched": censored,
            "loads": loads, "unloads": sum(m["unloads"] for m in stats["models"].values()),
            "loads_by_model": {LABEL[k]: m["loads"] for k, m in sorted(stats["models"].items())},
            "unloads_by_model": {LABEL[k]: m["unloads"] for k, m in sorted(stats["models"].items())},
            "loads_per_1000_replies": round(loads / replies * 1000, 1) if replies else None,
            "wait_p50_s": round(common.percentile(waits, 50), 2), "wait_p99_s": round(common.percentile(waits, 99), 2),
            "wait_max_s": round(max(waits), 2),
            "wait_p99_by_model_s": {m: round(common.percentile(v, 99), 2) for m, v in sorted(per_model.items())},
            "peak_memory_gb": round(stats["memory"]["peak_bytes"] / GB, 1), "timeline": timeline}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--duration", type=float, default=70.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second")
    p.add_argument("--drain", type=float, default=40.0,
                   help="seconds to wait for the last replies (≥ the bound, aging + a load, so every request can be served)")
    p.add_argument("--speed", type=float, default=0.05, help="simulator speed (0.05: 0.15 s replies, 1.5 s loads)")
    p.add_argument("--quick", action="store_true", help="20 s of arrivals at 2/s, 8 s drain")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rate, args.drain = min(args.duration, 20.0), max(args.rate, 2.0), min(args.drain, 40.0)
    for name in ("duration", "rate", "speed"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}: must be > 0, got {getattr(args, name)}")

    slots, max_resident = capacity()
    sched = schedule(args.rate, args.duration)
    log(f"{len(sched)} requests ({''.join(LABEL[m] for _, m in sched[:8])}…); sizing: {slots} slots with two "
        f"models, at most {max_resident} resident")
    rows = [run_aibot(args.database_url, sched, args.speed, args.drain, args.keep_logs),
            run_fifo(sched, args.speed, args.drain, slots, max_resident)]
    aibot, fifo = rows
    fewer = (fifo["loads_per_1000_replies"] or 0) / aibot["loads_per_1000_replies"] \
        if aibot["loads_per_1000_replies"] else None
    # Requests never dispatched carry only a lower bound on their wait: past 1 % of them, the p99 is a
    # lower bound too, and "bounded" cannot be shown.
    lower_bound = aibot["not_dispatched"] > 0.01 * aibot["requests"]
    aibot["wait_p99_is_lower_bound"] = lower_bound
    fifo["wait_p99_is_lower_bound"] = fifo["not_dispatched"] > 0.01 * fifo["requests"]
    bound = AGING_SECONDS + aibot["load_s_max"]
    bounded = aibot["wait_p99_by_model_s"].get("B", 0) <= bound and aibot["wait_p99_s"] <= bound and not lower_bound
    met = fewer is not None and fewer >= 3 and bounded and aibot["not_dispatched"] == 0
    for r in rows:
        r["wait_p99_A_B_C_s"] = " / ".join(str(r["wait_p99_by_model_s"].get(m, "-")) for m in "ABC")
    print(common.table(rows, ["dispatcher", "requests", "replies", "not_dispatched", "loads", "loads_per_1000_replies",
                              "wait_p50_s", "wait_p99_s", "wait_max_s", "wait_p99_A_B_C_s", "peak_memory_gb"],
                       title=f"Swap thrash: A B A C at {args.rate:g}/s for {args.duration:g}s on {MEMORY_GB} GB "
                             f"(2 of 3 models fit; {slots} slots)"))
    print(f"loads per 1,000 replies: FIFO / aibot = {fewer:.1f}×" if fewer is not None
          else "loads per 1,000 replies: aibot loaded nothing (or answered nothing)")
    print(f"target: ≥ 3× fewer loads, every request dispatched, p99 wait (all and B) ≤ aging + load time "
          f"({AGING_SECONDS:.0f} + {aibot['load_s_max']:.1f} = {bound:.1f} s): {common.verdict(met)} "
          f"(aibot p99 wait {'≥ ' if lower_bound else ''}{aibot['wait_p99_s']:.1f} s, B's "
          f"{aibot['wait_p99_by_model_s'].get('B')} s, {aibot['not_dispatched']} not dispatched"
          f"{'' if bounded else ', NOT shown to be bounded'})")
    common.write_json(args.output_dir, NAME, {
        "definitions": {"wait": "enqueue -> request at the server; not-dispatched requests count the wait so far",
                        "fifo": "strict arrival order, LRU eviction when the head's model is not resident, "
                                "same slots and two-model limit as aibot's sizing"},
        "parameters": {"duration_s": args.duration, "rate": args.rate, "drain_s": args.drain, "speed": args.speed,
                       "memory_gb": MEMORY_GB, "slots": slots, "max_resident": max_resident},
        "target": {"fewer_loads_min": 3, "wait_p99_max_s": round(bound, 2), "met": met,
                   "fewer_loads": None if fewer is None else round(fewer, 2), "p99_bounded": bounded},
        "results": rows,
    })
    if not args.no_plot:
        common.save_plot(args.output_dir, NAME, lambda fig: plot(fig, rows), size=(12, 5))
    return 0


def plot(fig, rows: list[dict]) -> None:
    colours = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green"}
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        for m in "ABC":
            pts = [t for t in r["timeline"] if t[1] == m]
            ax.scatter([t[0] for t in pts], [max(t[2], 1e-3) for t in pts], s=8, c=colours[m], label=m,
                       marker="o")
        ax.set_yscale("log")
        ax.axhline(AGING_SECONDS, color="red", linestyle=":", label="aging (30 s)")
        ax.set_xlabel("arrival (s)")
        ax.set_ylabel("wait until dispatched (s, log)")
        ax.set_title(f"{r['dispatcher']}: {r['loads']} loads, {r['loads_per_1000_replies']} per 1,000 replies, "
                     f"p99 wait {r['wait_p99_s']} s", fontsize=9)
        ax.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
