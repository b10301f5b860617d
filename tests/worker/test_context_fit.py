"""A prompt is fitted to the serving instance's context (llama.cpp: per slot, n_ctx / parallel) before it
is sent, and one that cannot fit is rejected at once with the reason, without burning attempts."""

from __future__ import annotations

import pytest

from aibot.harness import entity, write_config
from aibot.queue import jobs
from aibot.settings import Settings
from aibot.sim import SimServer
from aibot.sim.catalog import GB, ModelSpec
from aibot.sim.chat import FakeChatServer
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import register_sims

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def router(conn, db_url, tmp_path, monkeypatch):
    # 4096 tokens over 4 slots: 1024 per request, as the real router reports (n_ctx / parallel).
    s = SimServer(SimConfig(api="llamacpp-router", models=[ModelSpec("tiny", GB, context_length=4096)],
                            preloaded=["tiny"], parallel=4, speed=1.0, ttft_seconds=0.005,
                            per_token_seconds=0.001, reply_tokens=5)).start()
    chat = FakeChatServer().start()
    try:
        register_sims(conn, {"router": s})
        servers = [{"name": "router", "url": s.url, "kind": "llamacpp-router", "capabilities": {"maxMemory": 16}}]
        ents = [entity("talker", "tiny", maxTokens=40, nom=200),
                entity("verbose", "tiny", maxTokens=40, systemPrompt="Always say this. " * 400)]
        path = write_config(tmp_path / "c.json", servers=servers, entities=ents)
        yield s, chat, Settings(database_url=db_url, config_path=path, chat_api_url=chat.url, lease_seconds=30,
                                sink="chat")
    finally:
        chat.stop()
        s.stop()


def enqueue(conn, mid: str, ent: str, context: list[str]) -> int:
    return jobs.enqueue_many(conn, [jobs.NewJob(
        source="chat", source_message_id=mid, entity_id=ent, model="tiny", priority=10,
        payload={"message_id": mid, "text": "what do you think?", "username": "alice", "context": context})])[0]


def run(st):
    from aibot.worker.runtime import Runtime

    rt = Runtime(st)
    try:
        rt.run_invocation()
    finally:
        rt.close()


def test_a_long_history_is_trimmed_to_the_slot_and_answered(conn, router):
    s, chat, st = router
    assert conn.execute("SELECT context_length FROM aibot.model_instances").fetchone()["context_length"] == 1024
    history = [f"user{i}: " + "tell me more about the weather today " * 4 for i in range(150)]  # ~5000 tokens
    job_id = enqueue(conn, "m1", "talker", history)
    run(st)
    job = jobs.get(conn, job_id)
    assert job["state"] == "done", job
    assert job["attempts"] == 1 and chat.replies_by_reply_to() == {"m1": 1}
    assert s.model_stats("tiny")["rejected"] == 0       # the router never saw a prompt over its slot


def test_a_prompt_that_cannot_fit_is_rejected_at_once_with_the_reason(conn, router):
    s, chat, st = router
    job_id = enqueue(conn, "m2", "verbose", [])
    run(st)
    job = jobs.get(conn, job_id)
    assert job["state"] == "rejected", job
    assert "need" in job["reason"] and "allows" in job["reason"] and "per request" in job["reason"], job["reason"]
    assert s.model_stats("tiny")["served"] == 0 and s.model_stats("tiny")["rejected"] == 0   # nothing sent
    assert chat.replies_by_reply_to() == {}
