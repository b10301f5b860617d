"""Bad answers from LLM servers: through every backend, and through the worker's handling of a job.

A server may answer anything (garbage, HTML from a proxy, `choices: []`, a body cut off half way, a
wrong content type, nothing at all in time). Every backend must turn that into a `ChatResult` or a
typed `BackendError` with a message naming the endpoint; the worker must record the failure on the
job (server fault: attempt refunded, server health noted) and carry on, leaving other jobs alone.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibot.backends import registry
from aibot.backends.base import BackendError, ChatRequest, ChatResult
from aibot.backends.factory import Timeouts, make_backend
from aibot.cluster.sizing import GB
from aibot.harness import entity, write_config
from aibot.queue import jobs
from aibot.settings import Settings
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.chat import FakeChatServer
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import register_sims

pytestmark = pytest.mark.timeout(180)


# --- a server that answers whatever the test says ----------------------------------------------------


class _Plan:
    status = 200
    content_type = "application/json"
    body = b"{}"
    cut = False          # announce the full length, send half, close


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        plan: _Plan = self.server.plan
        self.send_response(plan.status)
        self.send_header("Content-Type", plan.content_type)
        self.send_header("Content-Length", str(len(plan.body)))
        if plan.cut:
            self.send_header("Connection", "close")
        self.end_headers()
        if plan.cut:
            self.wfile.write(plan.body[: len(plan.body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(plan.body)

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def rogue():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.plan = _Plan()
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                       max_leaves=8)
ALMOST = st.sampled_from([
    {"choices": []}, {"choices": None}, {"choices": [{}]}, {"choices": [{"message": None}]},
    {"choices": [{"message": {"content": None}}]}, {"choices": [{"message": {"content": 5}}]},
    {"choices": [{"text": ["x"]}]}, {"message": {"content": None}}, {"message": "hi"}, {"response": 7},
    {"error": {"message": "model crashed"}}, {"error": "model not found"}, {"output": [{"type": "x"}]},
])
BODIES = (st.builds(lambda v: json.dumps(v).encode(), JSONISH | ALMOST)
          | st.binary(max_size=200)
          | st.sampled_from([b"", b"<html><body><h1>502 Bad Gateway</h1></body></html>", b"\xff\xfe\x00",
                             b'{"choices": [{"message": {"content": "ok"}}]', b"data: {broken\n\n"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(registry.kinds())), status=st.sampled_from([200, 200, 200, 201, 204, 400, 404, 429, 500, 502, 503]),
       ctype=st.sampled_from(["application/json", "text/html", "text/plain", "application/octet-stream",
                              "text/event-stream", "application/x-ndjson"]),
       body=BODIES, cut=st.booleans(), stream=st.booleans())
def test_any_answer_is_a_result_or_a_typed_error(rogue, kind, status, ctype, body, cut, stream):
    rogue.plan.status, rogue.plan.content_type, rogue.plan.body, rogue.plan.cut = status, ctype, body, cut and len(body) > 1
    url = f"http://127.0.0.1:{rogue.server_address[1]}"
    backend = make_backend(kind, url, timeouts=Timeouts(read=2, total=4, connect=2))
    try:
        result = backend.chat(ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream))
    except BackendError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        assert "127.0.0.1" in str(exc) or "HTTP" in str(exc) or "/" in str(exc), f"no endpoint named: {exc}"
        return
    finally:
        backend.close()
    assert isinstance(result, ChatResult) and isinstance(result.text, str)
    assert 200 <= status < 300, f"a {status} answer must not become a reply"


# --- the worker's handling -----------------------------------------------------------------------------


def _sim(name: str, model: str) -> SimServer:
    return SimServer(SimConfig(api="lmstudio", name=name, models=[ModelSpec(model, 15 * GB, parallel=2)],
                               preloaded=[model], speed=0.01, reply_tokens=8)).start()


@pytest.fixture
def cluster(conn, db_url, tmp_path, monkeypatch):
    bad, good = _sim("bad", "m-bad"), _sim("good", "m-good")
    chat = FakeChatServer().start()
    try:
        register_sims(conn, {"bad": bad, "good": good})
        servers = [{"name": n, "url": s.url, "capabilities": {"maxMemory": 128}} for n, s in (("bad", bad), ("good", good))]
        path = write_config(tmp_path / "c.json", servers=servers,
                            entities=[entity("eb", "m-bad", rate_limits={"maxPostsPerMinute": 100}),
                                      entity("eg", "m-good", rate_limits={"maxPostsPerMinute": 100})])
        # The worker's override of the backends' read timeout (AIBOT_BACKEND_READ_TIMEOUT).
        yield bad, good, chat, Settings(database_url=db_url, config_path=path, chat_api_url=chat.url, lease_seconds=30,
                                        sink="chat", backend_read_timeout=0.5)
    finally:
        chat.stop()
        bad.stop()
        good.stop()


def _enqueue(conn, mid: str, ent: str, model: str) -> int:
    return jobs.enqueue_many(conn, [jobs.NewJob(source="chat", source_message_id=mid, entity_id=ent, model=model,
                                                priority=10, payload={"message_id": mid, "text": "hi", "username": "u"})])[0]


@pytest.mark.parametrize("fault, error_part", [
    ("error", "HTTP 5"), ("html", "HTTP 502"), ("malformed", ""), ("empty_choices", ""),
    ("truncated", ""), ("slow", "timed out"),
])
def test_worker_records_a_bad_answer_and_serves_the_other_job(conn, cluster, fault, error_part):
    from aibot.worker.runtime import Runtime

    bad, good, chat, st_ = cluster
    bad.set_faults(script=[fault] * 5, slow_seconds=2.0)
    bad_id, good_id = _enqueue(conn, "mb", "eb", "m-bad"), _enqueue(conn, "mg", "eg", "m-good")
    rt = Runtime(st_)
    try:
        assert rt.backends._timeouts.read == 0.5
        for _ in range(2):          # one invocation may find only one of the two claimable first
            rt.run_invocation()
    finally:
        rt.close()
    bad_job, good_job = jobs.get(conn, bad_id), jobs.get(conn, good_id)
    assert good_job["state"] == "done", good_job
    assert chat.replies_by_reply_to() == {"mg": 1}
    assert bad_job["state"] == "queued", bad_job
    assert bad_job["attempts"] == 0 and bad_job["server_faults"] >= 1, "a server's bad answer refunds the attempt"
    assert bad_job["last_error"] and error_part in bad_job["last_error"], bad_job["last_error"]
    assert bad_job["reply"] is None
    # The server answered: the fault belongs to its model (the pair), not to the whole server.
    srv = conn.execute("SELECT failure_count FROM aibot.servers WHERE name = 'bad'").fetchone()
    pair = conn.execute("SELECT failure_count, last_error FROM aibot.model_health WHERE model = 'm-bad'").fetchone()
    assert srv["failure_count"] == 0 and pair["failure_count"] >= 1, (srv, pair)
    assert conn.execute("SELECT count(*) AS n FROM aibot.rate_events WHERE job_id = %s", (bad_id,)).fetchone()["n"] == 0, \
        "a failed generation gives its rate-limit reservation back"
    assert conn.execute("SELECT count(*) AS n FROM aibot.slots WHERE job_id IS NOT NULL").fetchone()["n"] == 0


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_bad_timeout_overrides_name_the_variable(value):
    from aibot.backends import Timeouts

    with pytest.raises(ValueError, match="AIBOT_BACKEND_READ_TIMEOUT"):
        Settings.from_sources({"AIBOT_BACKEND_READ_TIMEOUT": value})
    assert Timeouts(**Settings.from_sources({}).backend_timeouts()) == Timeouts()
    assert Timeouts(**Settings.from_sources({"AIBOT_BACKEND_TOTAL_TIMEOUT": "7"}).backend_timeouts()).total == 7.0
