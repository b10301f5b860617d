"""The claim runtime on its own (`aibot.worker.runtime.Runtime`), in-process against a real Postgres, a
simulated llama.cpp router and the fake chat server: claim -> generate -> deliver -> complete, and every
branch that ends a claim another way.

Each test enqueues one job, runs one invocation (or two), and asserts what the job, the slot, the rate
limit, the server's and the model's health, the simulator and the chat server say afterwards.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aibot.harness import entity, write_config
from aibot.queue import jobs
from aibot.settings import Settings
from aibot.sim import SimServer
from aibot.sim.catalog import GB, ModelSpec
from aibot.sim.chat import FakeChatServer
from aibot.sim.config import SimConfig
from aibot.worker.runtime import Runtime
from tests.support.cluster_rows import register_sims, slots
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

ROOMY = {"maxPostsPerMinute": 100}   # a limit that never bites: the reservation and its refund are visible


class _BadRequest(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that refuses every chat request as the client's fault (HTTP 400)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"message": "invalid value for temperature", "type": "invalid_request_error"}})
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture
def world(conn, db_url, tmp_path):
    sim = SimServer(SimConfig(api="llamacpp-router", models=[ModelSpec("tiny", GB, context_length=4096)],
                              preloaded=["tiny"], parallel=4, speed=1.0, ttft_seconds=0.005,
                              per_token_seconds=0.001, reply_tokens=5)).start()
    chat = FakeChatServer().start()
    refuser = ThreadingHTTPServer(("127.0.0.1", 0), _BadRequest)
    refuser.daemon_threads = True
    threading.Thread(target=refuser.serve_forever, daemon=True).start()
    try:
        register_sims(conn, {"router": sim})
        # The refusing server holds its model as far as aibot knows (a row and a slot, no listing).
        rid = conn.execute("INSERT INTO aibot.servers (name, url, kind, health) VALUES ('refuser', %s, 'openai', "
                           "'healthy') RETURNING id", (f"http://127.0.0.1:{refuser.server_address[1]}",)).fetchone()["id"]
        slots(conn, rid, "refused-m", 1)
        ents = [entity("plain", "tiny", rate_limits=ROOMY),
                entity("limited", "tiny", rate_limits={"maxPostsPerMinute": 1}),
                entity("off", "tiny", enabled=False),
                entity("verbose", "tiny", rate_limits=ROOMY, systemPrompt="Always say this. " * 400),
                entity("blank", "tiny", rate_limits=ROOMY, trimAfter=["tiny"]),
                entity("strict", "refused-m", rate_limits=ROOMY)]
        path = write_config(tmp_path / "c.json", servers=[{"name": "router", "url": sim.url, "kind": "llamacpp-router",
                                                          "capabilities": {"maxMemory": 16}}], entities=ents)
        settings = Settings(database_url=db_url, config_path=path, chat_api_url=chat.url, lease_seconds=30,
                            sink="chat")
        yield sim, chat, settings
    finally:
        refuser.shutdown()
        refuser.server_close()
        chat.stop()
        sim.stop()


@pytest.fixture
def runtime(world):
    rt = Runtime(world[2])
    yield rt
    rt.close()


def enqueue(conn, mid: str, ent: str, *, text: str = "what do you think?", model: str = "tiny") -> int:
    return jobs.enqueue_many(conn, [jobs.NewJob(
        source="chat", source_message_id=mid, entity_id=ent, model=model, priority=10,
        payload={"message_id": mid, "text": text, "username": "alice"})])[0]


def held_slots(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM aibot.slots WHERE job_id IS NOT NULL").fetchone()["n"]


def rate_events(conn, job_id: int) -> int:
    return conn.execute("SELECT count(*) AS n FROM aibot.rate_events WHERE job_id = %s", (job_id,)).fetchone()["n"]


def server_failures(conn, name: str) -> int:
    return conn.execute("SELECT failure_count FROM aibot.servers WHERE name = %s", (name,)).fetchone()["failure_count"]


def model_failures(conn, model: str) -> int:
    row = conn.execute("SELECT failure_count FROM aibot.model_health WHERE model = %s", (model,)).fetchone()
    return row["failure_count"] if row else 0


def test_claim_generate_deliver_complete(conn, world, runtime):
    sim, chat, _ = world
    job_id = enqueue(conn, "m1", "plain")
    assert runtime.run_invocation() == 1
    job = jobs.get(conn, job_id)
    assert job["state"] == "done" and job["attempts"] == 1, job
    assert job["reply"]["text"] and job["reply"]["server"] == "router" and job["reply"]["entity"] == "plain"
    assert job["started_at"] is not None and job["finished_at"] is not None
    assert chat.replies_by_reply_to() == {"m1": 1}
    assert [r["id"] for r in chat.replies()] == [f"aibot-{job_id}"]
    assert sim.model_stats("tiny")["served"] == 1
    assert held_slots(conn) == 0 and rate_events(conn, job_id) == 1, "the slot is back, the post is counted"


@pytest.mark.parametrize("ent, why", [("ghost", "unknown entity: 'ghost'"), ("off", "entity disabled: 'off'")])
def test_an_unknown_or_disabled_entity_is_rejected(conn, world, runtime, ent, why):
    sim, chat, _ = world
    job_id = enqueue(conn, "m1", ent)
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert (job["state"], job["reason"]) == ("rejected", why)
    assert sim.model_stats("tiny")["served"] == 0 and chat.replies() == [] and held_slots(conn) == 0


def test_a_rate_limited_job_is_deferred_not_dropped(conn, world, runtime):
    sim, chat, _ = world
    first = enqueue(conn, "m1", "limited")
    runtime.run_invocation()
    second = enqueue(conn, "m2", "limited")
    runtime.run_invocation()
    assert jobs.get(conn, first)["state"] == "done"
    job = jobs.get(conn, second)
    assert job["state"] == "queued" and job["attempts"] == 0, "a deferral refunds the attempt"
    waits = conn.execute("SELECT extract(epoch FROM available_at - now()) AS s FROM aibot.jobs WHERE id = %s",
                         (second,)).fetchone()["s"]
    assert 30 < waits <= 60, "runnable again when the minute's window has room"
    assert chat.replies_by_reply_to() == {"m1": 1} and sim.model_stats("tiny")["served"] == 1
    assert held_slots(conn) == 0 and rate_events(conn, second) == 0


def test_a_request_that_cannot_fit_is_rejected_before_anything_is_sent(conn, world, runtime):
    sim, chat, _ = world
    job_id = enqueue(conn, "m1", "verbose")
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert job["state"] == "rejected" and job["reason"].startswith("cannot build the request: "), job["reason"]
    assert sim.model_stats("tiny")["served"] == 0 and sim.model_stats("tiny")["rejected"] == 0
    assert rate_events(conn, job_id) == 0 and held_slots(conn) == 0, "the reservation is given back"


def test_a_server_fault_backs_the_server_off_and_refunds_the_attempt(conn, world, runtime):
    sim, chat, _ = world
    sim.begin_outage(mode="refuse")
    job_id = enqueue(conn, "m1", "plain")
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert job["state"] == "queued" and job["attempts"] == 0 and job["server_faults"] == 1, job
    assert "Unreachable" in job["last_error"] or "Timeout" in job["last_error"], job["last_error"]
    assert server_failures(conn, "router") == 1 and model_failures(conn, "tiny") == 0
    assert rate_events(conn, job_id) == 0 and held_slots(conn) == 0 and chat.replies() == []


def test_a_model_fault_backs_off_the_pair_not_the_server(conn, world, runtime):
    sim, chat, _ = world
    sim.set_faults(script=["malformed"])
    job_id = enqueue(conn, "m1", "plain")
    # One job per invocation: the retry's jittered delay can be near 0, and a second claim in the same
    # invocation would then succeed and reset the pair's count this test reads.
    runtime.budget_seconds = 0.0
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert job["state"] == "queued" and job["attempts"] == 0 and job["server_faults"] == 1, job
    assert server_failures(conn, "router") == 0 and model_failures(conn, "tiny") == 1
    assert rate_events(conn, job_id) == 0 and held_slots(conn) == 0 and chat.replies() == []


def test_a_request_fault_is_the_jobs_own_and_burns_the_attempt(conn, world, runtime):
    _, chat, _ = world
    job_id = enqueue(conn, "m1", "strict", model="refused-m")
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert job["state"] == "queued" and job["attempts"] == 1 and job["server_faults"] == 0, job
    assert "HTTP 400" in job["last_error"] and "temperature" in job["last_error"], job["last_error"]
    assert server_failures(conn, "refuser") == 0 and model_failures(conn, "refused-m") == 0
    assert rate_events(conn, job_id) == 0 and held_slots(conn) == 0 and chat.replies() == []


def test_a_context_overflow_at_the_server_is_rejected_at_once(conn, world, runtime):
    sim, chat, _ = world
    # Without a known context per request nothing is trimmed, so the router itself refuses the prompt.
    conn.execute("UPDATE aibot.model_instances SET context_length = NULL WHERE model = 'tiny'")
    job_id = enqueue(conn, "m1", "verbose")
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert job["state"] == "rejected" and "does not fit the context of tiny on router" in job["reason"], job
    assert job["attempts"] == 1 and sim.model_stats("tiny")["rejected"] == 1
    assert server_failures(conn, "router") == 0 and model_failures(conn, "tiny") == 0
    assert rate_events(conn, job_id) == 0 and held_slots(conn) == 0 and chat.replies() == []


@pytest.mark.parametrize("ent, text, why", [
    ("plain", "say nothing [sim:skip]", "model answered [SKIP]"),
    ("blank", "what do you think?", "empty reply after post-processing"),
])
def test_a_skip_or_an_empty_reply_posts_nothing(conn, world, runtime, ent, text, why):
    sim, chat, _ = world
    job_id = enqueue(conn, "m1", ent, text=text)
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    assert (job["state"], job["reason"]) == ("skipped", why)
    assert sim.model_stats("tiny")["served"] == 1 and chat.replies() == []
    assert rate_events(conn, job_id) == 0 and held_slots(conn) == 0


def test_a_failed_delivery_keeps_the_reply_and_delivers_it_without_generating_again(conn, world, runtime):
    sim, chat, _ = world
    chat.set_faults(fail_next_posts=1)
    job_id = enqueue(conn, "m1", "plain")
    runtime.run_invocation()
    job = jobs.get(conn, job_id)
    # The retry delay is full jitter from 0 s, so the same invocation may already have re-claimed it.
    assert job["state"] in ("queued", "done") and job["reply"] is not None, job
    # The failed post's attempt was refunded: 0, or 1 if the re-claim that delivered already counted its own.
    assert job["attempts"] == (0 if job["state"] == "queued" else 1), "a sink outage is not the job's"
    assert job["last_error"].startswith("delivery failed"), job
    if job["state"] == "queued":
        assert held_slots(conn) == 0 and chat.replies() == []

    def delivered() -> bool:
        runtime.run_invocation()
        return jobs.get(conn, job_id)["state"] == "done"

    wait_for(delivered, timeout=30, message="the stored reply delivered once the job is runnable again")
    assert chat.replies_by_reply_to() == {"m1": 1} and chat.replies()[0]["text"] == job["reply"]["text"]
    assert sim.model_stats("tiny")["served"] == 1, "the retry delivered the stored reply, it did not generate"


def test_a_worker_that_lost_its_lease_neither_posts_nor_completes(conn, world, runtime):
    sim, chat, settings = world
    sim.set_faults(script=["slow"], slow_seconds=5.0)
    job_id = enqueue(conn, "m1", "plain")
    first = threading.Thread(target=runtime.run_invocation, daemon=True)
    first.start()
    wait_for(lambda: sim.stats()["faults_injected"].get("slow") == 1, timeout=10,
             message="the first worker's request is at the server, held there")
    # Its lease runs out (no heartbeat in this test) and the reclaim hands the job to another worker.
    conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (job_id,))
    assert jobs.reclaim_expired(conn) == 1
    other = Runtime(settings)
    try:
        other.run_invocation()
    finally:
        other.close()
    assert jobs.get(conn, job_id)["state"] == "done"
    first.join(timeout=30)
    assert not first.is_alive()
    assert jobs.get(conn, job_id)["state"] == "done", "the late worker's completion was refused (fencing token)"
    assert sim.model_stats("tiny")["served"] == 2
    assert chat.replies_by_reply_to() == {"m1": 1}
    assert chat.stats()["duplicates"] == 0, "the fenced-out worker's reply could not be stored, so it was not posted"
    assert held_slots(conn) == 0
