"""Fault injection over real sockets: what a client sees for each fault, outages, determinism."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from aibot.sim import GB, FaultConfig, ModelSpec, SimConfig, SimServer
from tests.support.waiting import wait_for
from tests.support.sim import sim_factory

MODELS = [ModelSpec("pub/m", 1 * GB, parallel=4)]


@pytest.fixture
def make_sim():
    yield from sim_factory(models=MODELS, preloaded=["pub/m"], speed=0.001, reply_tokens=10)


BODY = {"model": "pub/m", "messages": [{"role": "user", "content": "hi"}]}


def post_chat(client: httpx.Client, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={**BODY, **extra})


def test_error_rate_is_close_to_configured_and_repeatable(make_sim):
    statuses = []
    for _ in range(2):
        sim = make_sim(faults=FaultConfig(error_rate=0.25), seed=7)
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            statuses.append([post_chat(c).status_code for _ in range(200)])
        failed = sum(s >= 500 for s in statuses[-1])
        assert 30 <= failed <= 70
        assert sim.stats()["faults_injected"] == {"error": failed}
        assert sim.stats()["requests"]["by_status"].get("200") == 200 - failed
    assert statuses[0] == statuses[1]                 # same seed, same sequence
    assert set(statuses[0]) <= {200, 500, 503}


def test_error_body_is_json_in_the_flavour_shape(make_sim):
    sim = make_sim()
    sim.fail_next("error")
    r = post_chat(httpx.Client(base_url=sim.url))
    assert r.status_code in (500, 503) and r.json()["error"]["type"] == "server_error"


def test_html_error_page(make_sim):
    sim = make_sim(faults=FaultConfig(script=["html"]))
    with httpx.Client(base_url=sim.url) as c:
        r = post_chat(c)
        assert r.status_code == 502 and r.headers["content-type"].startswith("text/html")
        assert "<h1>502 Bad Gateway</h1>" in r.text
        assert post_chat(c).status_code == 200        # the script is used up


def test_malformed_json_body(make_sim):
    sim = make_sim()
    sim.fail_next("malformed")
    r = post_chat(httpx.Client(base_url=sim.url))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert sim.model_stats("pub/m")["served"] == 1   # the model did the work; the body is what broke


def test_empty_choices(make_sim):
    sim = make_sim()
    sim.fail_next("empty_choices")
    r = post_chat(httpx.Client(base_url=sim.url))
    assert r.status_code == 200 and r.json()["choices"] == []


def test_truncated_body_and_stream(make_sim):
    sim = make_sim()
    sim.fail_next("truncated", "truncated")
    with httpx.Client(base_url=sim.url, timeout=5) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            post_chat(c)
        seen = []
        with pytest.raises(httpx.RemoteProtocolError):
            with c.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                for line in r.iter_lines():
                    seen.append(line)
        assert seen and "data: [DONE]" not in seen
        assert post_chat(c).status_code == 200        # the server is fine afterwards
    st = sim.model_stats("pub/m")
    assert st["in_flight"] == 0 and st["failed"] == 1   # the cut stream released its slot


def test_slow_answer_exceeds_client_read_timeout(make_sim):
    sim = make_sim(faults=FaultConfig(slow_seconds=5.0))
    sim.fail_next("slow")
    with httpx.Client(base_url=sim.url, timeout=httpx.Timeout(5.0, read=0.3)) as c:
        t = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            post_chat(c)
        assert time.monotonic() - t < 2
    # the slow request still holds its slot, like a stuck generation
    assert sim.model_stats("pub/m")["in_flight"] == 1


def test_outage_refuses_connections_then_recovers(make_sim):
    sim = make_sim()
    url = sim.url
    with httpx.Client(base_url=url, timeout=2) as pooled:
        assert post_chat(pooled).status_code == 200   # a kept-alive connection exists
        r = httpx.post(f"{url}/_sim/faults", json={"outage_seconds": 0.8})
        assert r.status_code == 200
        wait_for(lambda: sim.in_outage, 5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v1/models", timeout=2)
        with pytest.raises(httpx.TransportError):
            post_chat(pooled)

        def up() -> bool:
            try:
                return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, 10, message="server back after the outage")
        assert post_chat(pooled).status_code == 200
    assert sim.url == url
    assert sim.stats()["outage"]["count"] == 1 and not sim.stats()["outage"]["active"]


def test_outage_503_mode_and_admin_still_works(make_sim):
    sim = make_sim(faults=FaultConfig(outage_mode="503"))
    with httpx.Client(base_url=sim.url, timeout=5) as c:
        assert c.post("/_sim/outage", json={}).status_code == 200
        wait_for(lambda: sim.in_outage, 5)
        r = post_chat(c)
        assert r.status_code == 503 and "outage" in r.json()["error"]["message"]
        assert c.get("/_sim/stats").json()["outage"]["active"] is True
        assert c.post("/_sim/outage/end").status_code == 200
        assert post_chat(c).status_code == 200
        assert c.get("/_sim/stats").json()["outage"]["rejected"] == 1


def test_refuse_outage_needs_a_duration_over_http(make_sim):
    sim = make_sim()
    r = httpx.post(f"{sim.url}/_sim/outage", json={"mode": "refuse"})
    assert r.status_code == 400 and "seconds" in r.json()["error"]


def test_scheduled_outage_window_from_config(make_sim):
    sim = make_sim(faults=FaultConfig(outage_windows=[(0.0, 0.5)]))
    wait_for(lambda: sim.stats()["outage"]["count"] == 1, 5)
    wait_for(lambda: not sim.in_outage, 5)
    assert httpx.get(f"{sim.url}/v1/models").status_code == 200


def test_faults_admin_endpoint_merges_validates_and_clears(make_sim):
    sim = make_sim()
    with httpx.Client(base_url=sim.url) as c:
        r = c.post("/_sim/faults", json={"error_rate": 0.1, "next": ["html"]})
        assert r.status_code == 200 and r.json()["error_rate"] == 0.1 and r.json()["script"] == ["html"]
        assert c.post("/_sim/faults", json={"slow_seconds": 2}).json()["error_rate"] == 0.1
        bad = c.post("/_sim/faults", json={"error_rate": 3})
        assert bad.status_code == 400 and "faults.error_rate" in bad.json()["error"]
        bad = c.post("/_sim/faults", json={"eror_rate": 0.1})
        assert bad.status_code == 400 and "eror_rate" in bad.json()["error"]
        assert post_chat(c).status_code == 502
        cleared = c.post("/_sim/faults", json={"clear": True}).json()
        assert cleared["error_rate"] == 0 and cleared["script"] == []
        assert c.get("/_sim/faults").json() == cleared
        assert c.get("/_sim/stats").json()["faults_injected"] == {"html": 1}


def test_fault_scope_all_reaches_listing_endpoints(make_sim):
    sim = make_sim(faults=FaultConfig(scope="all", script=["error", "html"]))
    assert httpx.get(f"{sim.url}/v1/models").status_code in (500, 503)
    assert httpx.get(f"{sim.url}/api/v1/models").status_code == 502
    assert httpx.get(f"{sim.url}/api/v1/models").status_code == 200
    chat_only = make_sim(faults=FaultConfig(script=["error"]))
    assert httpx.get(f"{chat_only.url}/v1/models").status_code == 200
    assert post_chat(httpx.Client(base_url=chat_only.url)).status_code in (500, 503)


def test_faults_under_concurrency_keep_slot_accounting_straight(make_sim):
    sim = make_sim(faults=FaultConfig(error_rate=0.2, truncated_rate=0.2, malformed_rate=0.1), seed=3,
                   parallel=2, speed=0.01)

    def one(i: int) -> str:
        try:
            with httpx.Client(base_url=sim.url, timeout=10) as c:
                return str(post_chat(c, stream=bool(i % 2)).status_code)
        except httpx.TransportError:
            return "cut"
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(40)))
    assert "200" in outcomes
    wait_for(lambda: sim.model_stats("pub/m")["in_flight"] == 0, 5)
    st = sim.model_stats("pub/m")
    assert st["peak_in_flight"] <= 2 and st["queued"] == 0
