"""The operator panels (issue 15): per-model queue with who will serve it, per-persona wait, loads and
evictions per minute, processes with their heartbeat; in the HTTP API, in `aibot status`, and pure."""

from __future__ import annotations

import datetime as dt

import pytest

from aibot.ops import inspection
from aibot.settings import get_settings
from tests.ops.test_inspection import GB, add_job, db_now, seed
from tests.web.test_web import http, server  # noqa: F401 - fixtures

WHY = ("no server can load 'big': alpha: not enough memory even after evicting idle models: needs "
       "90GB (config models[\"big\"].sizeGB) + 3GB per request")


def panels(conn) -> dict:
    ids = seed(conn)
    now = db_now(conn)
    add_job(conn, model="big", entity_id="eve", created_at=now - dt.timedelta(seconds=90), waiting_reason=WHY)
    add_job(conn, model="m3", entity_id="zed")
    conn.execute("INSERT INTO aibot.model_instances (server_id, model, state, size_bytes) VALUES (%s, 'm3', 'loading', %s)",
                 (ids["s1"], 4 * GB))
    conn.execute("INSERT INTO aibot.model_loads (server_id, model, action, ok, started_at, finished_at) VALUES "
                 "(%(s)s, 'm1', 'load', true, now() - interval '3 min', now() - interval '3 min'), "
                 "(%(s)s, 'm2', 'unload', true, now() - interval '3 min', now() - interval '3 min'), "
                 "(%(s)s, 'big', 'load', false, now() - interval '1 min', now() - interval '1 min'), "
                 "(%(s)s, 'old', 'load', true, now() - interval '2 hours', now() - interval '2 hours')", {"s": ids["s1"]})
    return ids


def test_serving_in_the_operators_words():
    assert inspection.serving({"served_by": ["a", "b"], "loading_on": ["c"]}) == "served by a, b"
    assert inspection.serving({"served_by": [], "loading_on": ["c"]}) == "loading on c"
    assert inspection.serving({"served_by": [], "loading_on": [], "waiting_reason": WHY, "queued": 1}) == \
        "no server can hold it: " + WHY.split("'big': ", 1)[1]
    assert inspection.serving({"served_by": [], "loading_on": [], "waiting_reason": "load timed out",
                               "queued": 1}) == "no server can hold it: load timed out"
    assert inspection.serving({"served_by": [], "loading_on": [], "queued": 2}).startswith("not placed yet")
    assert inspection.serving({"served_by": [], "loading_on": [], "queued": 0}) == "idle"


def test_model_queue_entity_wait_and_load_timeline(conn):
    panels(conn)
    q = {r["model"]: r for r in inspection.model_queue(conn)}
    # m1 is loaded on alpha (usable) and beta (down): one replica serves.
    assert (q["m1"]["queued"], q["m1"]["replicas"], q["m1"]["serving"]) == (4, 1, "served by alpha")
    assert q["m3"]["serving"] == "loading on alpha" and q["m3"]["replicas"] == 0
    assert q["big"]["serving"].startswith("no server can hold it: alpha: not enough memory")
    assert 85 < q["big"]["oldest_wait_seconds"] < 200
    assert (q["m2"]["queued"], q["m2"]["serving"]) == (0, "served by alpha")
    assert [r["model"] for r in inspection.unservable(conn)] == ["big"]

    waits = {r["entity_id"]: r for r in inspection.entity_wait(conn)}
    assert waits["eve"]["queued"] == 4 and waits["zed"]["queued"] == 2
    # eve's jobs claimed in the last hour waited 2, 4, 6 s (seed) and 25 s (the running one).
    assert waits["eve"]["p50_wait_seconds"] == pytest.approx(5.0, abs=0.01)

    series = inspection.load_timeline(conn, 60)
    assert [(p["loads"], p["unloads"], p["failed"]) for p in series] == [(1, 1, 0), (0, 0, 1)]


def test_panels_over_http(conn, http):  # noqa: F811
    panels(conn)
    models = {m["model"]: m for m in http.get("/api/model-queue").json()["models"]}
    assert models["big"]["serving"].startswith("no server can hold it") and models["m1"]["replicas"] == 1
    assert {e["entity_id"] for e in http.get("/api/entity-wait").json()["entities"]} >= {"eve", "zed"}
    assert len(http.get("/api/loads-per-minute?minutes=60").json()["series"]) == 2
    conn.execute("INSERT INTO aibot.workers (worker_id, host, pid, role) VALUES ('bot@h:1', 'h', 1, 'bot')")
    body = http.get("/api/workers").json()
    assert body["fresh_seconds"] == get_settings().heartbeat_fresh_seconds() and [w["role"] for w in body["workers"]] == ["bot"]
    assert http.get("/api/loads-per-minute?minutes=0").status_code == 400

    from tests.web.test_web import parse_metrics

    samples = parse_metrics(http.get("/metrics").text)
    per = {name: {lab["model"]: v for lab, v in samples[name]}
           for name in ("aibot_model_queued", "aibot_model_replicas", "aibot_model_unservable")}
    assert (per["aibot_model_queued"]["m1"], per["aibot_model_replicas"]["m1"], per["aibot_model_unservable"]["m1"]) \
        == (4, 1, 0)
    assert per["aibot_model_unservable"] == {"m1": 0, "big": 1, "m3": 0, "m2": 0}


def test_status_lists_models_no_server_can_serve(conn, capsys):
    from aibot.cli import main

    panels(conn)
    assert main(["status", "--plain"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("QUEUED, NO SERVER CAN SERVE YET"):]
    [line] = [ln for ln in section.splitlines() if ln.strip().startswith("big ")]
    assert "no server can hold it: alpha: not enough memory" in line
    assert " m1 " not in section.split("\n\n")[0]
