"""`aibot serve` over real loopback HTTP and WebSocket, against real Postgres."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from aibot import db
from aibot.cli import main
from aibot.cli.serve_cmd import read_token
from aibot.ops import inspection
from aibot.web import events
from aibot.web.server import AppServer, ServeError, check_bind, host_of, origin_ok
from tests.ops.test_inspection import add_job, seed, state_of
from tests.support.waiting import wait_for

TOKEN = "t0ken-for-tests"


@pytest.fixture
def server(db_url):
    srv = AppServer(db_url, port=0, stats_interval=0.3).start()
    wait_for(srv.hub.listening.is_set, timeout=10, message="event listener")
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws" + query


def ws_connect(url: str, **kw) -> ClientConnection:
    """A client from the `websockets` package (the server side is uvicorn's: two implementations)."""
    return connect(url, open_timeout=5, close_timeout=5, **kw)


def send_json(client: ClientConnection, obj) -> None:
    client.send(json.dumps(obj))


def next_frame(client: ClientConnection, pred, timeout: float = 5.0) -> dict:
    """The first frame matching `pred`, skipping others (e.g. periodic stats)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no matching WebSocket frame before the deadline")
        try:
            f = json.loads(client.recv(timeout=left))
        except TimeoutError:
            continue
        if pred(f):
            return f


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, through prometheus_client's own parser (which raises on a malformed line)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


# --- original monitor endpoints -------------------------------------------------------------------

def test_health(conn, http):
    seed(conn)
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["queueSize"] == 5
    assert abs(body["timestamp"] / 1000 - time.time()) < 60


def test_queue_stats_shape_and_order(conn, http):
    ids = seed(conn)
    body = http.get("/queue-stats").json()
    got = [it["id"] for it in body["items"]]
    # running first, then claim order (rank): q_crit_old, q_crit_later, q_high (rank 20*30 later), q_bg
    assert got[0] == ids["running"]
    assert set(got) == {ids["running"], ids["q_crit_old"], ids["q_crit_later"], ids["q_high"], ids["q_bg"]}
    item = next(it for it in body["items"] if it["id"] == ids["q_crit_old"])
    assert {"id", "priority", "entity", "message", "claimedBy", "timestamp", "routerReason"} <= set(item)
    assert item["message"] == "hello there" and item["priority"] == 5 and item["entity"] == "eve"
    running = body["items"][0]
    assert running["claimedBy"] == "w1@host:1"
    st = body["stats"]
    for key in ("totalItems", "unclaimedItems", "claimedItems", "priorityBands", "averageWaitTime", "throughput",
                "oldestItemAge", "staleClaims", "throughputHour", "lastSuccess", "avgWait"):
        assert key in st, key
    assert st["totalItems"] == 5 and st["priorityBands"]["critical"] == 2


def test_queue_delete_and_clear(conn, http):
    ids = seed(conn)
    r = http.post(f"/queue-delete/{ids['q_high']}")
    assert r.status_code == 200 and r.json() == {"success": True, "itemId": ids["q_high"]}
    assert state_of(conn, ids["q_high"]) == "cancelled"
    r = http.post(f"/queue-delete/{ids['running']}")
    assert r.status_code == 409 and "is running" in r.json()["error"]
    r = http.post("/queue-delete/abc")
    assert r.status_code == 400 and "id: 'abc'" in r.json()["error"]
    r = http.post("/queue-clear")
    assert r.json() == {"success": True, "cleared": 3}
    assert state_of(conn, ids["running"]) == "running"


# --- aibot API -----------------------------------------------------------------------------------------

def test_api_servers_models_jobs(conn, http):
    ids = seed(conn)
    servers = {s["name"]: s for s in http.get("/api/servers").json()["servers"]}
    assert servers["beta"]["backoff_level"] == 3 and servers["alpha"]["slots_total"] == 3
    models = http.get("/api/models").json()["models"]
    assert {(m["server"], m["model"], m["slots_used"], m["slots_total"]) for m in models} >= {("alpha", "m1", 1, 3)}
    jobs = http.get("/api/jobs", params={"state": "dead"}).json()["jobs"]
    assert [j["id"] for j in jobs] == [ids["dead"]]
    r = http.get("/api/jobs", params={"state": "bogus"})
    assert r.status_code == 400 and "state: 'bogus' is not one of" in r.json()["error"]
    job = http.get(f"/api/jobs/{ids['q_crit_old']}").json()["job"]
    assert job["payload"] == {"text": "hello there"}
    assert http.get("/api/jobs/999999").status_code == 404
    series = http.get("/api/replies-per-minute", params={"minutes": 10}).json()["series"]
    assert len(series) == 10 and sum(p["replies"] for p in series) == 3


def test_api_retry_and_cancel(conn, http):
    ids = seed(conn)
    r = http.post(f"/api/jobs/{ids['dead']}/retry")
    assert r.status_code == 200 and r.json()["job"]["state"] == "queued"
    assert state_of(conn, ids["dead"]) == "queued"
    r = http.post(f"/api/jobs/{ids['q_bg']}/cancel")
    assert r.status_code == 200 and state_of(conn, ids["q_bg"]) == "cancelled"
    for action in ("retry", "cancel"):
        r = http.post(f"/api/jobs/{ids['running']}/{action}")
        assert r.status_code == 409 and f"job {ids['running']} is running" in r.json()["error"]
    assert http.post("/api/jobs/999999/retry").status_code == 404


def test_unknown_paths_and_methods(http):
    assert http.get("/nope").status_code == 404
    r = http.get("/queue-clear")
    assert r.status_code == 405 and "use POST" in r.json()["error"]


def test_metrics_parse_and_report_the_views(conn, http):
    ids = seed(conn)
    conn.execute("INSERT INTO aibot.model_loads (server_id, model, action, ok) VALUES (%s, 'm1', 'load', true), "
                 "(%s, 'm1', 'load', true), (%s, 'm2', 'load', false)", (ids["s1"], ids["s1"], ids["s1"]))
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    parsed = parse_metrics(r.text)

    def value(name, **labels):
        matches = [v for lab, v in parsed[name] if all(lab.get(k) == str(x) for k, x in labels.items())]
        assert len(matches) == 1, (name, labels, parsed.get(name))
        return matches[0]

    assert value("aibot_jobs", state="queued", band="critical") == 2
    assert value("aibot_jobs", state="queued", band="medium") == 0
    assert value("aibot_jobs", state="running", band="medium") == 1
    assert value("aibot_inflight", server="alpha", model="m1") == 1
    assert value("aibot_slots", server="alpha", model="m1") == 3
    assert value("aibot_server_backoff_level", server="beta") == 3
    assert value("aibot_server_failures", server="beta") == 4
    assert value("aibot_server_up", server="alpha") == 1 and value("aibot_server_up", server="beta") == 0
    assert value("aibot_model_loads_total", server="alpha", model="m1", action="load", outcome="ok") == 2
    assert value("aibot_model_loads_total", server="alpha", model="m2", action="load", outcome="failed") == 1
    assert value("aibot_job_latency_seconds_count") == 5  # 4 done + 1 skipped within the hour
    assert value("aibot_job_latency_seconds", quantile="0.5") > 0
    assert 99 <= value("aibot_queue_oldest_wait_seconds") < 120
    for line in r.text.splitlines():
        assert line.startswith("#") or line.startswith("aibot_")


def test_metrics_label_escaping(conn, http):
    from tests.ops.test_inspection import add_server

    hostile = 'a"b\\c\nd'
    add_server(conn, hostile, memory_bytes=10, health="healthy")
    r = http.get("/metrics")
    assert 'aibot_server_memory_bytes{server="a\\"b\\\\c\\nd"} 10.0' in r.text
    assert [lab["server"] for lab, _ in parse_metrics(r.text)["aibot_server_memory_bytes"]] == [hostile]


def test_every_metric_has_help_and_type(conn, http):
    seed(conn)
    text = http.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names == {
        "aibot_jobs", "aibot_queue_oldest_wait_seconds", "aibot_queue_runnable", "aibot_inflight", "aibot_slots",
        "aibot_server_failures", "aibot_server_backoff_level", "aibot_server_up", "aibot_server_draining",
        "aibot_server_memory_bytes", "aibot_server_accounted_bytes", "aibot_replies_per_minute",
        "aibot_job_wait_seconds", "aibot_job_duration_seconds", "aibot_job_latency_seconds", "aibot_model_loads",
        "aibot_workers", "aibot_model_queued", "aibot_model_replicas", "aibot_model_unservable"}, names
    assert "# TYPE aibot_model_loads_total counter" in text and "# TYPE aibot_job_latency_seconds summary" in text


def test_dashboard_is_served(http):
    r = http.get("/")
    assert r.status_code == 200 and "aibot queue monitor" in r.text and r.headers["content-type"].startswith("text/html")
    assert http.get("/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/dashboard.css").status_code == 200


# --- security ------------------------------------------------------------------------------------------

def test_public_bind_requires_a_token(db_url, capsys, monkeypatch):
    monkeypatch.delenv("AIBOT_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("AIBOT_SERVE_TOKEN_FILE", raising=False)
    with pytest.raises(ServeError, match="refusing to bind '0.0.0.0' without a token"):
        AppServer(db_url, host="0.0.0.0", port=0)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to bind '0.0.0.0' without a token" in capsys.readouterr().err
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", TOKEN)


def test_token_is_checked_on_every_request(db_url, conn):
    ids = seed(conn)
    srv = AppServer(db_url, port=0, token=TOKEN, live_events=False).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            r = c.get("/health")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in r.text
            assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert c.get("/health", params={"token": TOKEN}).status_code == 200
            assert c.get("/metrics").status_code == 401 and c.get("/").status_code == 401
            assert c.post(f"/api/jobs/{ids['q_bg']}/cancel").status_code == 401
            assert state_of(conn, ids["q_bg"]) == "queued"
        with pytest.raises(InvalidStatus, match="401"):
            ws_connect(srv.url.replace("http", "ws") + "/ws")
        with pytest.raises(InvalidStatus, match="503"):  # admitted with the token; live events are off here
            ws_connect(srv.url.replace("http", "ws") + f"/ws?token={TOKEN}")
    finally:
        srv.stop()


def test_foreign_origin_and_host_are_refused(conn, http):
    ids = seed(conn)
    r = http.post(f"/api/jobs/{ids['q_bg']}/cancel", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    assert state_of(conn, ids["q_bg"]) == "queued"
    r = http.get("/health", headers={"Host": "evil.example:4001"})
    assert r.status_code == 403
    same = http.post(f"/api/jobs/{ids['q_bg']}/cancel", headers={"Origin": str(http.base_url).rstrip("/")})
    assert same.status_code == 200


def test_origin_and_host_helpers():
    assert origin_ok(None, "127.0.0.1:4001")
    assert origin_ok("http://127.0.0.1:4001", "127.0.0.1:4001")
    assert not origin_ok("http://127.0.0.1:4002", "127.0.0.1:4001")
    assert host_of("[::1]:4001") == "::1" and host_of("localhost:80") == "localhost" and host_of("::1") == "::1"


def test_read_token_sources(tmp_path):
    f = tmp_path / "tok"
    f.write_text(" abc \n")
    assert read_token(None, {"AIBOT_SERVE_TOKEN": "xyz"}) == "xyz"
    assert read_token(None, {"AIBOT_SERVE_TOKEN_FILE": str(f)}) == "abc"
    assert read_token(f, {"AIBOT_SERVE_TOKEN": "xyz"}) == "abc"
    assert read_token(None, {}) is None
    from aibot.cli import CliError

    with pytest.raises(CliError, match="cannot be read"):
        read_token(tmp_path / "missing", {})


# --- WebSocket -----------------------------------------------------------------------------------------

def test_websocket_frames_follow_the_queue(conn, server):
    sid = seed(conn)["s1"]
    with ws_connect(ws_url(server)) as ws:
        snap = next_frame(ws, lambda f: f["type"] == "snapshot")
        assert len(snap["data"]["items"]) == 5 and snap["data"]["stats"]["totalItems"] == 5
        assert set(snap) == {"type", "data", "timestamp"}

        jid = add_job(conn, priority=7, payload={"text": "new one"})
        # (the seed's own `queued` events may still be in flight: the dashboard keys items by id)
        f = next_frame(ws, lambda f: f["type"] == "queued" and f["data"]["item"]["id"] == jid)
        assert f["data"]["item"]["message"] == "new one"
        assert f["data"]["item"]["priority"] == 7

        conn.execute("UPDATE aibot.jobs SET state = 'running', server_id = %s, worker_id = 'w2' WHERE id = %s", (sid, jid))
        f = next_frame(ws, lambda f: f["type"] == "claimed")
        assert f["data"] == {"itemId": jid, "serverId": sid, "worker": "w2"}

        conn.execute("UPDATE aibot.jobs SET state = 'done', finished_at = now() WHERE id = %s", (jid,))
        f = next_frame(ws, lambda f: f["type"] == "completed")
        assert f["data"]["itemId"] == jid and f["data"]["success"] is True

        f = next_frame(ws, lambda f: f["type"] == "stats")
        assert "throughputHour" in f["data"] and "unclaimedItems" in f["data"]


def _notifies_of(db_url, action) -> list[str]:
    """The aibot_events payloads another session sees while `action(conn)` commits its job changes."""
    with psycopg.connect(db_url, autocommit=True) as listener, db.connect(db_url, autocommit=True) as conn:
        listener.execute("LISTEN aibot_events")
        action(conn)
        conn.execute("NOTIFY aibot_events, 'marker'")   # delivered in commit order: everything before is in
        got = []
        for n in listener.notifies(timeout=5):
            if n.payload == "marker":
                return got
            got.append(n.payload)
    raise AssertionError("the marker notification never arrived")


def test_job_events_are_sent_only_while_a_listener_is_registered(db_url):
    """Each event costs the committing claim or completion the notification queue's lock (0014): with no
    dashboard open, none is sent; a registered hub gets them; one whose registration expired does not."""
    def move(conn):
        jid = add_job(conn)
        conn.execute("UPDATE aibot.jobs SET state = 'running' WHERE id = %s", (jid,))

    assert _notifies_of(db_url, move) == []
    with db.connect(db_url, autocommit=True) as c:
        inspection.register_listener(c, "test-hub", 30)
    assert [json.loads(p)["type"] for p in _notifies_of(db_url, move)] == ["queued", "claimed"]
    with db.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE aibot.event_listeners SET expires_at = now() - interval '1 second'")
    assert _notifies_of(db_url, move) == []


def test_the_hub_is_registered_while_a_websocket_is_open(conn, server):
    def listeners():
        return [r["listener"] for r in conn.execute("SELECT listener FROM aibot.event_listeners WHERE expires_at > now()")]

    assert listeners() == [] and not server.hub.registered
    with ws_connect(ws_url(server)) as ws:
        next_frame(ws, lambda f: f["type"] == "snapshot")
        assert listeners() == [server.hub.listener]
        with ws_connect(ws_url(server)) as ws2:
            next_frame(ws2, lambda f: f["type"] == "snapshot")
        assert listeners() == [server.hub.listener]      # one subscriber is still there
    wait_for(lambda: listeners() == [], timeout=10, message="the hub to unregister when its last subscriber left")


def test_websocket_client_commands(conn, server):
    ids = seed(conn)
    with ws_connect(ws_url(server)) as ws:
        next_frame(ws, lambda f: f["type"] == "snapshot")
        send_json(ws, {"action": "delete", "itemId": ids["q_high"]})
        f = next_frame(ws, lambda f: f["type"] == "deleted")
        assert f["data"] == {"itemId": ids["q_high"]}
        assert state_of(conn, ids["q_high"]) == "cancelled"

        send_json(ws, {"action": "delete", "itemId": ids["running"]})
        f = next_frame(ws, lambda f: f["type"] == "error")
        assert "is running" in f["data"]["message"]

        send_json(ws, {"action": "explode"})
        f = next_frame(ws, lambda f: f["type"] == "error")
        assert "action: 'explode' is not one of delete, clear" in f["data"]["message"]

        send_json(ws, {"action": "clear"})
        f = next_frame(ws, lambda f: f["type"] == "snapshot")
        assert [it["id"] for it in f["data"]["items"]] == [ids["running"]]


def test_websocket_ping_pong_and_close(server):
    with ws_connect(ws_url(server)) as ws:
        next_frame(ws, lambda f: f["type"] == "snapshot")
        assert ws.ping(b"hi").wait(5), "no pong for the ping"
        ws.close(1000, "bye")
        assert ws.close_code == 1000
    wait_for(lambda: server.hub.subscriber_count == 0, timeout=5, message="subscriber removed after close")


def test_websocket_rejects_bad_handshake(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n")
        data = b""
        while b"Sec-WebSocket-Key" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and b"Sec-WebSocket-Key is not 16 base64-encoded bytes" in data, data
    r = httpx.get(server.url + "/ws", timeout=5)
    assert r.status_code == 400 and "Upgrade: websocket" in r.json()["error"]


def test_websocket_from_a_foreign_origin_is_refused(server):
    with pytest.raises(InvalidStatus, match="403"):
        ws_connect(ws_url(server), origin="http://evil.example")


def test_a_subscriber_that_falls_behind_is_dropped():
    """The listener thread never waits on a slow browser: past `max_pending` frames the client is dropped."""
    loop = asyncio.new_event_loop()
    try:
        sub = events.Subscriber(loop, max_pending=3)
        assert all(sub.offer({"n": i}) for i in range(5))     # handed to the loop, not yet queued
        loop.run_until_complete(asyncio.sleep(0))             # the loop queues them: the 4th overflows
        assert sub.dropped.is_set()
        assert sub.offer({"n": 9}) is False
        assert loop.run_until_complete(sub.next()) is None
    finally:
        loop.close()
    assert sub.offer({"n": 10}) is False                      # a closed loop is a gone client, not an error


def test_frames_for_events_is_pure():
    evs = events.parse_events(['{"type":"queued","id":1}', '{"type":"claimed","id":1,"server_id":2,"worker":"w"}',
                               'garbage', '{"type":"queued","id":9}', '{"type":"deleted","id":3}'])
    assert events.queued_ids(evs) == [1, 9]
    frames = events.frames_for(evs, {1: {"id": 1}}, timestamp=5)
    assert frames == [
        {"type": "queued", "data": {"item": {"id": 1}}, "timestamp": 5},
        {"type": "claimed", "data": {"itemId": 1, "serverId": 2, "worker": "w"}, "timestamp": 5},
        {"type": "deleted", "data": {"itemId": 3}, "timestamp": 5},
    ]


def test_grafana_dashboard_queries_only_metrics_that_exist(conn, http):
    """deploy/grafana-dashboard.json: valid JSON, every panel has a query, and every aibot_* series it
    names is one /metrics serves (a renamed metric must not leave a silently empty panel)."""
    import re
    from pathlib import Path

    seed(conn)
    conn.execute("INSERT INTO aibot.model_loads (server_id, model, action, ok) SELECT id, 'm1', 'load', true "
                 "FROM aibot.servers LIMIT 1")
    text = http.get("/metrics").text
    served = set(parse_metrics(text)) | {f.name for f in text_string_to_metric_families(text)}
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    used = {name for p in panels for t in p["targets"] for name in re.findall(r"\baibot_[a-z_]+", t["expr"])}
    used |= set(re.findall(r"\baibot_[a-z_]+", json.dumps(dashboard["templating"])))
    assert used and used <= served, used - served
    assert {"aibot_jobs", "aibot_inflight", "aibot_server_accounted_bytes", "aibot_model_loads_total",
            "aibot_workers", "aibot_job_latency_seconds"} <= used


def test_workers_metric_counts_fresh_heartbeats_and_keeps_silent_roles_at_zero(conn, http):
    conn.execute("INSERT INTO aibot.workers (worker_id, host, pid, role, started_at, heartbeat_at) VALUES "
                 "('w1', 'h', 1, 'worker', now(), now()), ('w2', 'h', 2, 'worker', now(), now() - interval '5 min'), "
                 "('b1', 'h', 3, 'bot', now(), now() - interval '5 min')")
    samples = {lab["role"]: v for lab, v in parse_metrics(http.get("/metrics").text)["aibot_workers"]}
    assert samples == {"worker": 1, "bot": 0, "scheduler": 0}


def test_workers_metric_has_a_sample_before_any_process_registers(conn, http):
    samples = {lab["role"]: v for lab, v in parse_metrics(http.get("/metrics").text)["aibot_workers"]}
    assert samples == {"worker": 0, "bot": 0, "scheduler": 0}
