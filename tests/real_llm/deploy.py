"""aibot as an operator runs it, pointed at a real llama.cpp router: `aibot scheduler` and
`dramatiq aibot.actors` subprocesses (aibot.harness), one `llamacpp-router` server in the config, jobs
ingested the way the bot ingests them (aibot.bot.ingest), replies into the postgres sink.

No refresh is run by hand and nothing is preloaded: aibot finds the router's models and loads them
itself, so the tests see its real cold start.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx

from aibot import db
from aibot.bot.ingest import ingest
from aibot.config import load_config
from aibot.harness import FAST_SCHEDULES, Stack, entity, write_config
from tests.real_llm.common import parse_metrics
from tests.real_llm.router import BROKEN, MODELS, Router
from tests.support.waiting import wait_for

SERVER = "router"
MAX_TOKENS = 8          # short replies: 2 cores, one inference thread per model
# entity -> model; `broken` exists so a test can queue work for the preset whose load fails.
ENTITIES = {"pirate": MODELS[0], "poet": MODELS[1], "broken": BROKEN}


@dataclass
class Deployment:
    stack: Stack
    router: Router
    db_url: str
    config_path: str
    started: float = field(default_factory=time.monotonic)
    _seq: int = 0

    def query(self, sql: str, params=()) -> list[dict]:
        with db.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params=()):
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def send(self, entity_ids: list[str], *, text: str = "Tell me about ship number {i}.",
             context: list[str] | None = None) -> list[int]:
        """Ingests one message per entity id (as the bot would from the chat) and returns the job ids."""
        messages = []
        for eid in entity_ids:
            self._seq += 1
            msg = {"id": f"m{self._seq}", "text": text.format(i=self._seq), "username": f"user{self._seq}",
                   "message-type": "human", "botParams": {"entity": eid, "priority": self._seq % 3}}
            if context is not None:
                msg["context"] = context
            messages.append(msg)
        with db.connect(self.db_url, autocommit=True) as conn:
            result = ingest(conn, "chat", messages, load_config(self.config_path),
                            settings=SimpleNamespace(aging_seconds=30.0))
        assert result.new == len(messages), result.summary()
        return result.job_ids

    def jobs(self, ids: list[int]) -> list[dict]:
        return self.query("SELECT id, entity_id, model, state::text AS state, attempts, server_faults, last_error, "
                          "waiting_reason, reason, delivered_at, reply->>'text' AS text FROM aibot.jobs WHERE id = ANY(%s) "
                          "ORDER BY id", (ids,))

    def wait_done(self, ids: list[int], timeout: float) -> list[dict]:
        """Waits until none of `ids` is queued or running, then returns their rows."""
        def settled():
            self.assert_alive()
            return self.scalar("SELECT count(*)::int FROM aibot.jobs WHERE id = ANY(%s) "
                               "AND state IN ('queued', 'running')", (ids,)) == 0
        try:
            wait_for(settled, timeout=timeout, interval=0.1, message=f"{len(ids)} jobs to finish")
        except AssertionError:
            raise AssertionError(f"not finished after {timeout}s: {self.jobs(ids)}\n{self.diagnostics()}") from None
        return self.jobs(ids)

    def assert_answered_once(self, ids: list[int]) -> None:
        rows = self.jobs(ids)
        assert [r["state"] for r in rows] == ["done"] * len(ids), f"{rows}\n{self.diagnostics()}"
        assert all(r["text"] and r["text"].strip() for r in rows), f"an empty reply was delivered: {rows}"
        replies = self.query("SELECT reply_to, count(*)::int AS n FROM aibot.replies r JOIN aibot.jobs j "
                             "ON j.source_message_id = r.reply_to WHERE j.id = ANY(%s) GROUP BY 1", (ids,))
        assert len(replies) == len(ids) and all(r["n"] == 1 for r in replies), \
            f"a reply is missing or doubled: {replies}"

    def loads(self, model: str | None = None) -> list[dict]:
        """aibot's record of its loads and unloads (aibot.model_loads), oldest first."""
        where = "WHERE model = %s" if model is not None else ""
        return self.query(f"SELECT model, action, reason, ok, error, started_at, finished_at, "
                          f"extract(epoch FROM finished_at - started_at)::float AS seconds "
                          f"FROM aibot.model_loads {where} ORDER BY id", (model,) if model is not None else ())

    def slot_rows(self) -> dict[str, int]:
        """aibot's slot rows per model on the router (free or held, not retired): its idea of capacity."""
        return {r["model"]: r["n"] for r in self.query(
            "SELECT sl.model, count(*)::int AS n FROM aibot.slots sl JOIN aibot.servers s ON s.id = sl.server_id "
            "WHERE s.name = %s AND NOT sl.retired GROUP BY 1", (SERVER,))}

    def instances(self) -> dict[str, str]:
        return {r["model"]: r["state"] for r in self.query(
            "SELECT mi.model, mi.state FROM aibot.model_instances mi JOIN aibot.servers s ON s.id = mi.server_id "
            "WHERE s.name = %s", (SERVER,))}

    def server(self) -> dict:
        return self.query("SELECT * FROM aibot.servers WHERE name = %s", (SERVER,))[0]

    def assert_alive(self) -> None:
        for proc in self.stack.procs:
            assert proc.alive(), f"{proc.name} exited:\n{self.stack.logs()[-4000:]}"

    def diagnostics(self) -> str:
        try:
            server = {k: v for k, v in self.server().items() if k in (
                "health", "failure_count", "backoff_level", "backoff_until", "last_error")}
            loads = [(r["model"], r["action"], r["ok"], r["error"], r["seconds"]) for r in self.loads()]
            states = self.query("SELECT state::text, count(*)::int FROM aibot.jobs GROUP BY 1")
        except Exception as exc:  # noqa: BLE001 - diagnostics must not hide the original failure
            return f"(diagnostics failed: {exc})"
        return (f"server: {server}\naibot instances: {self.instances()} slots: {self.slot_rows()}\n"
                f"router: {self.router.describe()}\nmodel_loads: {loads}\njobs: {states}\n"
                f"--- aibot logs ---\n{self.stack.logs()[-6000:]}\n--- router log ---\n{self.router.log()[-3000:]}")


def server_entry(router: Router) -> dict:
    # maxMemory is declared so the test exercises dispatch, not sizing: a model aibot has not seen yet
    # is assumed to be large until the server tells it otherwise (issue 10, finding 5).
    return {"name": SERVER, "url": router.url, "kind": "llamacpp-router", "enabled": True,
            "capabilities": {"maxMemory": 64}, "perRequestGB": 0.5}


@contextlib.contextmanager
def deployment(db_url: str, tmp_path: Path, router: Router, *, threads: int = 10,
               env: dict[str, str] | None = None, entities: dict | None = None) -> Iterator[Deployment]:
    ents = [entity(eid, model, maxTokens=MAX_TOKENS, temperature=0) for eid, model in (entities or ENTITIES).items()]
    config_path = write_config(tmp_path / "config.json", servers=[server_entry(router)], entities=ents)
    stack = Stack(db_url, config_path, workdir=tmp_path / "aibot-logs", env={
        # 1 s housekeeping ticks, as in the other end-to-end tests; AIBOT_TEST_DEFAULT_SCHEDULES=1 runs
        # aibot's production schedules instead (refresh 15 s, rebalance 30 s), as a new user would.
        **({} if os.environ.get("AIBOT_TEST_DEFAULT_SCHEDULES") == "1" else FAST_SCHEDULES),
        "AIBOT_SINK": "postgres",
        "AIBOT_SHUTDOWN_TIMEOUT": "5",
        "AIBOT_LEASE_SECONDS": "60",
        **(env or {}),
    })
    try:
        stack.start_scheduler()
        stack.start_workers(processes=1, threads=threads, shutdown_timeout_ms=10_000)
        yield Deployment(stack, router, db_url, config_path)
    finally:
        stack.stop()


class SlotSampler:
    """Samples, for each model, the router's busy slots (`/slots?model=`, `is_processing`) and requests
    waiting for a slot (`/metrics?model=` `llamacpp:requests_deferred`), bracketed by the slot rows
    (`rows()`: aibot's capacity per model) read just before and just after, so a busy count is compared
    with the capacity aibot had at that moment."""

    def __init__(self, router: Router, rows, models=MODELS, interval: float = 0.02) -> None:
        self.router, self.rows, self.models, self.interval = router, rows, list(models), interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._client = httpx.Client(timeout=5)

    def _busy(self, model: str) -> tuple[int | None, int | None]:
        base = self.router.url
        try:
            r = self._client.get(f"{base}/slots", params={"model": model, "autoload": "false"})
            busy = sum(1 for s in r.json() if s.get("is_processing")) if r.status_code == 200 else None
            m = self._client.get(f"{base}/metrics", params={"model": model, "autoload": "false"})
            deferred = int(parse_metrics(m.text).get("llamacpp:requests_deferred", 0)) if m.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None, None
        return busy, deferred

    def _run(self) -> None:
        while not self._stop.is_set():
            before = self.rows()
            seen = {m: self._busy(m) for m in self.models}
            after = self.rows()
            for m, (busy, deferred) in seen.items():
                if busy is not None:
                    self.samples.append({"model": m, "busy": busy, "deferred": deferred,
                                         "rows": max(before.get(m, 0), after.get(m, 0))})
            self._stop.wait(self.interval)

    def __enter__(self) -> SlotSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def over(self) -> list[dict]:
        return [s for s in self.samples if s["busy"] > s["rows"] or (s["deferred"] or 0) > 0]

    def peak(self) -> dict[str, int]:
        return {m: max((s["busy"] for s in self.samples if s["model"] == m), default=0) for m in self.models}
