"""Real servers: the original bot's example configuration against simulators that behave as LM Studio
0.4, Ollama and the llama.cpp router do (their documentation and source, see docs/backends.md), and the
recovery and fault-scope behaviours of issue 10, measured with aibot's real processes.

    python bench/real_servers.py [--scenarios lmstudio,ollama,router,recovery] [--messages 60]

- `lmstudio`: examples/config-aientities.json unchanged except the two server addresses (loopback
  simulators), 60 messages round robin over its enabled entities. Before issue 10 this answered 0 of 60
  (every load sent `the-eternal@f16` and was refused as model_not_found). Reports answered, loads per
  model, the most instances of one model a server ever held (LM Studio adds `key:2` on a second load),
  loads that named a variant, attempts.
- `ollama`: the same configuration with the servers declared `kind: ollama` (jobs then name
  `the-eternal-f16`, Ollama lists `the-eternal-f16:latest`): answered, loads per model.
- `router`: the same entities on a llama.cpp router simulator whose `god-mode-q8_0` preset points at a
  broken file: seconds until the waiting jobs show the router's failure, loads of the broken preset,
  answered for the others; plus one message whose history is far over the per-slot context.
- `recovery`: one LM Studio simulator refuses connections for 8 s while messages keep coming: seconds
  from the end of the outage to the first reply it serves, at the default scheduler ticks (target ≤ 5 s).

The example configuration's rate limits apply (10/min, 5/min, 30/min, 5–10 s apart), so the first
scenario's 60 replies take a few minutes of wall time; the table also shows the fastest those limits
allow. Results: bench/results/real_servers.json (with the commit measured).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import GB, log  # noqa: E402

NAME = "real_servers"
EXAMPLE = common.REPO / "examples" / "config-aientities.json"
SIZES_GB = {"f16": 15, "f32": 30, "q8_0": 8}
SCENARIOS = ("lmstudio", "ollama", "router", "recovery")


def example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())


def model_specs(doc: dict[str, Any], *, rename: bool = False) -> list:
    """Every quantization of every entity, as the server has it on disk: LM Studio `<base>@<quant>`
    (the entity's default first, so it is the selected variant), or renamed `<base>-<quant>`."""
    from aibot.sim.catalog import ModelSpec

    out, seen = [], set()
    for e in doc["entities"]:
        quants = dict(e.get("quantizations") or {})
        default = e.get("defaultQuantization")
        order = ([default] if default else []) + [q for q in quants if q != default]
        for q in order:
            path = (quants.get(q) or {}).get("modelPath") or f"{e.get('baseModel') or e.get('model')}@{q}"
            key = path.replace("@", "-") if rename else path
            if key not in seen:
                seen.add(key)
                out.append(ModelSpec(key, int(SIZES_GB.get(q, 15) * GB), parallel=4))
    return out


class LoadRequests:
    """The `model` of every REST load request each simulator receives (to count variant-named ones)."""

    PATHS = ("/api/v1/models/load", "/models/load", "/api/generate")

    def __init__(self, sims) -> None:
        self.models: list[str] = []
        for sim in sims:
            inner = sim.handle

            def handle(req, inner=inner):
                if req.method == "POST" and req.path in self.PATHS:
                    try:
                        self.models.append(str(req.json_object().get("model")))
                    except Exception:  # noqa: BLE001 - a malformed body is the simulator's to answer
                        pass
                return inner(req)

            sim.handle = handle


class InstancePeak:
    """Polls every simulator's instances: the most instances of one model a server held at once."""

    def __init__(self, sims) -> None:
        self.sims, self.peak, self._stop = sims, {}, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for s in self.sims:
                counts: dict[str, int] = {}
                for i in s.engine.instances():
                    counts[i.key] = counts.get(i.key, 0) + 1
                for k, n in counts.items():
                    self.peak[k] = max(self.peak.get(k, 0), n)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(2)


def run_config(url: str, doc: dict[str, Any], sims, env: dict[str, str] | None = None, *, fast: bool = True):
    """Writes `doc` with the simulators as its servers and prepares the real aibot processes (with the
    harness's fast scheduler ticks, or the production defaults when `fast` is False)."""
    from aibot.sim.chat import FakeChatServer  # noqa: F401  (RecordingChat below)
    from aibot.harness import FAST_SCHEDULES, Stack

    workdir = Path(common.tempfile.mkdtemp(prefix="aibot-bench-real-"))
    path = workdir / "config.json"
    path.write_text(json.dumps(doc, indent=1))
    chat = common.RecordingChat().start()
    stack = Stack(url, str(path), workdir=workdir / "logs", env={
        **(FAST_SCHEDULES if fast else {}), "AIBOT_CHAT_API_URL": chat.url, "AIBOT_SINK": "chat", "AIBOT_SHUTDOWN_TIMEOUT": "5",
        **(env or {})})
    return chat, stack


def post_round_robin(chat, entities: list[str], n: int, words: str = "please answer") -> list[str]:
    keys = []
    for i in range(n):
        key = common.key_of(i + 1)
        chat.post_human(f"{key} {words}", entity=entities[i % len(entities)], id=key, username="newcomer")
        keys.append(key)
    return keys


def query(url: str, text: str, params=None) -> list[dict]:
    from aibot import db

    with db.connect(url, autocommit=True) as conn:
        return conn.execute(text, params or ()).fetchall()


def loads_per_model(url: str) -> dict[str, int]:
    return {r["model"]: r["n"] for r in query(
        url, "SELECT model, count(*)::int AS n FROM aibot.model_loads WHERE action = 'load' AND ok GROUP BY 1")}


def fastest_allowed(doc: dict[str, Any], entities: list[str], n: int) -> float:
    """Seconds the example's rate limits need for n messages round robin (the floor for any dispatcher)."""
    per = {e: 0 for e in entities}
    for i in range(n):
        per[entities[i % len(entities)]] += 1
    worst = 0.0
    for e in doc["entities"]:
        if e["id"] not in per:
            continue
        rl, k = e.get("rateLimits") or {}, per[e["id"]]
        gap = max(rl.get("minSecondsBetweenPosts") or 0, 60 / rl["maxPostsPerMinute"] if rl.get("maxPostsPerMinute") else 0)
        worst = max(worst, (k - 1) * gap)
    return worst


def enabled_entities(doc: dict[str, Any]) -> list[str]:
    return [e["id"] for e in doc["entities"] if e.get("enabled", True)]


def with_servers(doc: dict[str, Any], sims, kind: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for entry, sim in zip(doc["lmStudioServers"], sims, strict=True):
        entry["ip"], entry["port"] = "127.0.0.1", int(sim.url.rsplit(":", 1)[1])
        entry["enabled"] = True
        if kind != "lmstudio":
            entry["kind"] = kind
    return doc


def scenario_new_user(url: str, kind: str, n: int, speed: float, timeout: float) -> dict[str, Any]:
    from aibot.sim import SimCluster
    from aibot.sim.cluster import ClusterSpec
    from aibot.sim.config import SimConfig

    base = example()
    specs = model_specs(base)   # both flavours see `<base>@<quant>` keys; Ollama lists them renamed
    cluster = ClusterSpec([SimConfig(name=f"sim-{i + 1}", api=kind, models=specs, memory_bytes=120 * GB,
                                     speed=speed, per_request_bytes=3 * GB) for i in range(2)])
    with SimCluster(cluster) as sims:
        doc = with_servers(base, sims.servers, kind)
        chat, stack = run_config(url, doc, sims.servers)
        entities = enabled_entities(doc)
        load_requests = LoadRequests(sims.servers)
        try:
            with InstancePeak(sims.servers) as peak:
                stack.start_bot()
                stack.start_workers(processes=1, threads=8)
                t0 = time.monotonic()
                keys = post_round_robin(chat, entities, n)
                with common.Ticker(f"{kind}: {n} messages", lambda: f"{chat.reply_count()}/{n} replies"):
                    try:
                        common.wait_until(lambda: chat.reply_count() >= n, timeout, f"{n} replies", 0.2)
                    except TimeoutError:
                        pass
                elapsed = time.monotonic() - t0
            loads = loads_per_model(url)
            variant_loads = sum(1 for m in load_requests.models if "@" in m)
            jobs = query(url, "SELECT state::text, attempts, last_error FROM aibot.jobs")
            return {
                "scenario": kind, "messages": n, "answered": len(set(keys) & set(chat.arrivals())),
                "duplicates": chat.stats().get("duplicates", 0),
                "seconds": round(elapsed, 1), "rate_limit_floor_seconds": round(fastest_allowed(doc, entities, n), 1),
                "loads_per_model": loads, "max_instances_of_one_model": max(peak.peak.values(), default=0),
                "load_requests": len(load_requests.models), "variant_named_loads": variant_loads,
                "max_attempts_of_a_job": max((j["attempts"] for j in jobs), default=0),
                "jobs_by_state": _count(j["state"] for j in jobs),
            }
        finally:
            stack.stop()
            chat.stop()


def scenario_router(url: str, speed: float, timeout: float) -> dict[str, Any]:
    from aibot.sim import SimServer
    from aibot.sim.config import SimConfig

    base = example()
    specs = model_specs(base, rename=True)
    broken = "god-mode-q8_0"
    sim = SimServer(SimConfig(name="router", api="llamacpp-router", models=specs, memory_bytes=120 * GB,
                              speed=speed, broken_models=[broken], jit=False, parallel=4)).start()
    try:
        doc = with_servers(base, [sim], "llamacpp-router") if len(base["lmStudioServers"]) == 1 else None
        if doc is None:
            doc = json.loads(json.dumps(base))
            doc["lmStudioServers"] = [{"name": "router", "ip": "127.0.0.1", "port": int(sim.url.rsplit(":", 1)[1]),
                                       "kind": "llamacpp-router", "capabilities": {"maxMemory": 120}}]
        chat, stack = run_config(url, doc, [sim])
        entities = enabled_entities(doc)
        try:
            stack.start_bot()
            stack.start_workers(processes=1, threads=8)
            t0 = time.monotonic()
            keys = post_round_robin(chat, entities, 9)
            long_key = common.key_of(99)
            history = [f"user{i}: " + "tell me more about the weather and the sea today " * 5 for i in range(120)]
            chat.post_human(f"{long_key} and what now?", entity=entities[0], id=long_key, username="newcomer",
                            context=history)

            def surfaced():
                rows = query(url, "SELECT last_error FROM aibot.jobs WHERE entity_id = 'god-mode' "
                                  "AND last_error LIKE %s LIMIT 1", ("%exit%",))
                return rows[0]["last_error"] if rows else None

            reason = common.wait_until(surfaced, 60, "the failed load on the waiting jobs", 0.05)
            surfaced_after = time.monotonic() - t0
            others = [k for k, e in zip(keys, [entities[i % len(entities)] for i in range(9)]) if e != "god-mode"]
            common.wait_until(lambda: set(others) | {long_key} <= set(chat.arrivals()), timeout, "the others' replies", 0.2)
            long_job = query(url, "SELECT state::text, attempts FROM aibot.jobs WHERE source_message_id = %s", (long_key,))
            return {
                "scenario": "router", "failed_load_surfaced_seconds": round(surfaced_after, 2),
                "waiting_reason": reason[:300], "loads_of_broken_preset": sim.model_stats(broken)["load_requests"],
                "others_answered": f"{len(set(others) & set(chat.arrivals()))}/{len(others)}",
                "long_prompt": {"answered": long_key in chat.arrivals(), **(long_job[0] if long_job else {})},
                "context_overflows_at_server": sum(sim.model_stats(s.key).get("rejected", 0) for s in specs),
            }
        finally:
            stack.stop()
            chat.stop()
    finally:
        sim.stop()


def scenario_recovery(url: str, speed: float, outage: float = 8.0) -> dict[str, Any]:
    from aibot.sim import SimCluster
    from aibot.sim.cluster import ClusterSpec
    from aibot.sim.config import SimConfig

    base = example()
    for e in base["entities"]:
        e.pop("rateLimits", None)     # recovery, not rate limits, is measured here
    specs = model_specs(base)
    cluster = ClusterSpec([SimConfig(name="sim-1", api="lmstudio", models=specs, memory_bytes=120 * GB, speed=speed,
                                     preloaded=[s.key for s in specs if s.key.endswith(("@f16", "@q8_0"))][:3])])
    with SimCluster(cluster) as sims:
        doc = with_servers({**base, "lmStudioServers": base["lmStudioServers"][:1]}, sims.servers, "lmstudio")
        chat, stack = run_config(url, doc, sims.servers, fast=False)   # recovery at the default schedules
        entities = enabled_entities(doc)
        sim = sims.servers[0]
        try:
            stack.start_bot()
            stack.start_workers(processes=1, threads=8)
            warm = post_round_robin(chat, entities, 3)
            common.wait_until(lambda: set(warm) <= set(chat.arrivals()), 120, "warm-up replies", 0.1)
            sim.begin_outage(mode="refuse")
            stop = threading.Event()
            sent: list[str] = []

            def keep_posting():
                i = 100
                while not stop.wait(0.5):
                    i += 1
                    key = common.key_of(i)
                    chat.post_human(f"{key} still there?", entity=entities[i % len(entities)], id=key, username="u")
                    sent.append(key)

            poster = threading.Thread(target=keep_posting, daemon=True)
            poster.start()
            time.sleep(outage)        # the outage itself: wall time is what is measured
            sim.end_outage()
            ended = common.now()
            first = common.wait_until(
                lambda: min((t for k, t in chat.arrivals().items() if k in sent and t > ended), default=None), 60,
                "the first reply after the outage", 0.02)
            stop.set()
            poster.join(2)
            return {"scenario": "recovery", "outage_seconds": outage,
                    "first_reply_after_outage_seconds": round(first - ended, 2),
                    "server_backoff_level": query(url, "SELECT backoff_level FROM aibot.servers")[0]["backoff_level"]}
        finally:
            stack.stop()
            chat.stop()


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--messages", type=int, default=60)
    p.add_argument("--speed", type=float, default=0.05, help="simulator time scale (loads and generation)")
    p.add_argument("--timeout", type=float, default=480.0)
    args = p.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    results = []
    for name in chosen:
        with common.scratch_database(args.database_url, f"real_{name}") as url:
            log(f"== {name}")
            if name in ("lmstudio", "ollama"):
                results.append(scenario_new_user(url, name, args.messages, args.speed, args.timeout))
            elif name == "router":
                results.append(scenario_router(url, args.speed, args.timeout))
            else:
                results.append(scenario_recovery(url, args.speed))
            log(json.dumps(results[-1], default=str))
    doc = {"benchmark": NAME, "command": common.command_line(), "code": common.CODE_AT_START,
           "host": common.host_info(), "results": results}
    path = common.write_json(args.output_dir, NAME, doc)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
