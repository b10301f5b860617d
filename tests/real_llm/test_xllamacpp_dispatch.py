"""The dispatch path end to end against two real llama.cpp servers (xllamacpp + Gemma 3 270M, see
tests/real_llm/xllamacpp.py): config with two entities on two models served on two ports (kind `llamacpp`), the
scheduler's refresh (servers, loaded models, slot rows), jobs ingested the way the bot does, a real
`dramatiq aibot.actors` subprocess, replies into the postgres sink.

What could go wrong and is checked: a reply lost or posted twice, a job generated twice, a job sent to
the server that does not serve its model, more requests in flight at a server than it has slots (read
from the server itself: llama.cpp's `requests_deferred` gauge counts requests waiting for a slot).

Deselect with `-m 'not real_llm'`; skips by itself when the packages are not installed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from aibot import db
from aibot.bot.ingest import ingest
from aibot.cluster import refresh
from aibot.config import load_config
from aibot.harness import Stack, entity, write_config
from tests.real_llm.xllamacpp import parse_metrics, real_llm_servers  # noqa: F401  (fixture)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.real_llm, pytest.mark.timeout(300)]

PER_ENTITY = 8
MAX_TOKENS = 12


class SlotProbe:
    """Samples llama.cpp's /metrics on every server while work runs: the most requests generating at
    once, and the most waiting for a slot (non-zero = we sent more than the server's slots)."""

    def __init__(self, urls, interval: float = 0.02):
        self.urls, self.interval = list(urls), interval
        self.max_processing = {u: 0 for u in self.urls}
        self.max_deferred = {u: 0 for u in self.urls}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._client = httpx.Client(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for u in self.urls:
                try:
                    text = self._client.get(f"{u}/metrics").text
                except httpx.HTTPError:
                    continue
                gauges = parse_metrics(text)
                self.max_processing[u] = max(self.max_processing[u], int(gauges.get("llamacpp:requests_processing", 0)))
                self.max_deferred[u] = max(self.max_deferred[u], int(gauges.get("llamacpp:requests_deferred", 0)))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> SlotProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


def test_parse_metrics_reads_gauges_and_skips_comments():
    text = "# HELP x\nllamacpp:requests_deferred 3\nllamacpp:requests_processing 2\nbroken line x\n"
    assert parse_metrics(text) == {"llamacpp:requests_deferred": 3.0, "llamacpp:requests_processing": 2.0}


def rows(url: str, sql: str, params=()) -> list[dict]:
    with db.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def test_two_entities_two_real_servers_each_message_answered_once(db_url, tmp_path, real_llm_servers):  # noqa: F811
    started = time.monotonic()
    llm = real_llm_servers
    names = ("llama-a", "llama-b")
    servers = [{"name": n, "url": u, "kind": "llamacpp", "enabled": True, "capabilities": {"maxMemory": 64}}
               for n, u in zip(names, llm.urls)]
    ents = [entity("pirate", llm.models[0], maxTokens=MAX_TOKENS, temperature=0),
            entity("poet", llm.models[1], maxTokens=MAX_TOKENS, temperature=0)]
    config_path = write_config(tmp_path / "config.json", servers=servers, entities=ents)

    database = db.Database(db_url, max_size=2)
    try:
        refresh.refresh_all(database, config_path=config_path)   # what the scheduler's refresh tick does
    finally:
        database.close()
    slots = {(r["name"], r["model"]): r["n"] for r in rows(
        db_url, "SELECT s.name, sl.model, count(*)::int AS n FROM aibot.slots sl "
                "JOIN aibot.servers s ON s.id = sl.server_id WHERE NOT sl.retired GROUP BY 1, 2")}
    assert slots == {(names[0], llm.models[0]): llm.n_parallel, (names[1], llm.models[1]): llm.n_parallel}

    messages = [{"id": f"m{i}", "text": f"Tell me about ship number {i}.", "username": f"user{i}",
                 "message-type": "human", "botParams": {"entity": ("pirate", "poet")[i % 2], "priority": i % 3}}
                for i in range(2 * PER_ENTITY)]
    with db.connect(db_url, autocommit=True) as conn:   # jobs + doorbells in one transaction, as the bot does
        result = ingest(conn, "chat", messages, load_config(config_path), settings=SimpleNamespace(aging_seconds=30.0))
    assert result.new == len(messages)

    stack = Stack(db_url, config_path, workdir=tmp_path / "logs",
                  env={"AIBOT_SINK": "postgres", "AIBOT_SHUTDOWN_TIMEOUT": "5", "AIBOT_LEASE_SECONDS": "60"})
    try:
        with SlotProbe(llm.urls) as probe:
            stack.start_workers(processes=1, threads=2 * llm.n_parallel + 2, shutdown_timeout_ms=10_000)

            def finished():
                left = rows(db_url, "SELECT count(*)::int AS n FROM aibot.jobs WHERE state IN ('queued', 'running')")
                assert stack.procs[0].alive(), stack.logs()[-4000:]
                return left[0]["n"] == 0
            try:
                wait_for(finished, timeout=180, interval=0.1, message="every job to finish")
            except AssertionError:
                raise AssertionError(f"{rows(db_url, 'SELECT state, count(*) FROM aibot.jobs GROUP BY 1')}\n"
                                     f"{stack.logs()[-4000:]}") from None
        dispatch_seconds = time.monotonic() - started
    finally:
        stack.stop()

    jobs = rows(db_url, "SELECT j.source_message_id, j.entity_id, j.model, j.state::text AS state, j.attempts, "
                        "s.name AS server, j.reply->>'text' AS text FROM aibot.jobs j "
                        "LEFT JOIN aibot.servers s ON s.id = j.server_id ORDER BY j.id")
    assert [j["state"] for j in jobs] == ["done"] * len(messages), jobs
    assert all(j["attempts"] == 1 for j in jobs), "a job was generated more than once"
    served_by = dict(zip(llm.models, names))
    assert all(j["server"] == served_by[j["model"]] for j in jobs), "a job went to a server without its model"
    assert all(j["text"] and j["text"].strip() for j in jobs), "an empty reply was delivered"

    replies = rows(db_url, "SELECT reply_to, entity_id, message FROM aibot.replies ORDER BY reply_to")
    assert sorted(r["reply_to"] for r in replies) == sorted(m["id"] for m in messages), "a reply is missing or doubled"
    entity_of = {m["id"]: m["botParams"]["entity"] for m in messages}
    assert all(r["entity_id"] == entity_of[r["reply_to"]] for r in replies), "reply posted as the wrong entity"
    assert all(r["message"]["message-type"] == "AI" and r["message"]["text"] for r in replies)

    assert rows(db_url, "SELECT count(*)::int AS n FROM aibot.slots WHERE job_id IS NOT NULL")[0]["n"] == 0
    assert probe.samples > 10, "the slot probe barely ran"
    assert probe.max_deferred == {u: 0 for u in llm.urls}, f"requests waited for a slot: {probe.max_deferred}"
    assert all(v <= llm.n_parallel for v in probe.max_processing.values()), probe.max_processing
    assert max(probe.max_processing.values()) == llm.n_parallel, \
        f"the slots were never used in parallel: {probe.max_processing}"
    print(f"\nreal-LLM dispatch: {len(messages)} replies, {dispatch_seconds:.1f}s to the last completion, "
          f"peak in flight {probe.max_processing}")


def test_slot_probe_sees_an_over_committed_server(real_llm_servers):  # noqa: F811
    """The control for the check above: sending more requests than slots must show up as deferred."""
    llm = real_llm_servers
    url = llm.urls[0]
    body = {"model": llm.models[0], "messages": [{"role": "user", "content": "Count slowly to twenty."}],
            "max_tokens": 8, "temperature": 0}
    with SlotProbe([url], interval=0.01) as probe, httpx.Client(timeout=120) as client, \
            ThreadPoolExecutor(llm.n_parallel + 2) as pool:
        codes = list(pool.map(lambda _: client.post(f"{url}/v1/chat/completions", json=body).status_code,
                              range(llm.n_parallel + 2)))
    assert codes == [200] * (llm.n_parallel + 2)
    assert probe.max_deferred[url] >= 1, f"the probe did not see the queued requests ({probe.samples} samples)"
