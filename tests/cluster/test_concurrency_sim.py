"""Adaptive concurrency end to end: real Postgres, a simulator whose batching saturates at 2, the
product's claim and rebalance. The slots start at the server's parallel (4), each level is measured
as traffic grows, and once the full parallel is measured and shows no gain past the knee they settle at
the knee (2); four users then get two generations at a time."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from aibot import db
from aibot.backends.base import ChatRequest
from aibot.backends.factory import backend_for_server
from aibot.cluster import concurrency, slots, state
from aibot.generation.tokens import reply_tokens
from aibot.queue import jobs
from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from tests.support.cluster_rows import register_sims

pytestmark = pytest.mark.timeout(180)

#: Per-token slowdown with k requests batched: 2 requests cost no more than one, a third and a fourth
#: each cost 0.8 of a request more, so aggregate tokens/s peaks at 2 and then falls (k / multiplier:
#: 1, 2, 1.67, 1.54) -- a server whose compute two decodes already saturate, where a bigger batch only
#: adds contention. (On a curve that is exactly flat past 2, this closed loop measures a few % more
#: at 3 than at 2 -- each request's fixed HTTP/claim overhead is not slowed by the batch, and a level's
#: samples mix neighbouring batch sizes -- which is close enough to the 10 % bar to make the test flaky.)
SATURATING = [1.0, 1.0, 1.8, 2.6]
PER_USER = 10     # generations per user and phase: more than concurrency.DEFAULT_MIN_SAMPLES


def run_users(db_url: str, users: int, per_user: int, tag: str, in_flight: list[int]) -> None:
    """`users` closed-loop chat users: each posts a message, a worker claims a job (slot-aware) and
    generates it on the simulator, storing its timings as the worker does, then the user posts again.
    `in_flight` records the most generations running at once."""
    lock = threading.Lock()
    running = [0]
    errors: list[BaseException] = []

    def user(u: int) -> None:
        try:
            with db.connect(db_url, autocommit=True) as conn:
                servers = {r["id"]: r for r in state.servers(conn)}
                backend = None
                for i in range(per_user):
                    jobs.enqueue_many(conn, [jobs.NewJob(source="t", source_message_id=f"{tag}-{u}-{i}",
                                                         entity_id="e", model="m1", priority=50)])
                    deadline = time.monotonic() + 30
                    claim = None
                    while claim is None:
                        assert time.monotonic() < deadline, "no slot within 30 s"
                        claim = jobs.claim(conn, f"w{tag}{u}", lease_seconds=60, use_slots=True)
                        if claim is None:
                            time.sleep(0.002)   # every slot busy: poll the claim again
                    backend = backend or backend_for_server(servers[claim.server_id])
                    with lock:
                        running[0] += 1
                        in_flight[0] = max(in_flight[0], running[0])
                    started_at = datetime.now(timezone.utc)
                    result = backend.chat(ChatRequest(model=claim.model, messages=[{"role": "user", "content": "hi"}]))
                    generated_at = datetime.now(timezone.utc)
                    with lock:
                        running[0] -= 1
                    reply = {"text": result.text, "tokens": reply_tokens(result.text, result.completion_tokens)}
                    assert jobs.store_reply(conn, claim.job_id, claim.token, reply,
                                            started_at=started_at, generated_at=generated_at)
                    assert jobs.complete(conn, claim.job_id, claim.token)
                if backend is not None:
                    backend.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def curve_of(conn, server_id: int) -> str:
    rows = slots.queries.all(conn, "cluster_concurrency_samples",
                             {"server_id": server_id, "window_s": slots.SAMPLE_WINDOW_SECONDS, "limit": slots.SAMPLE_LIMIT})
    levels = concurrency.curve(concurrency.Sample(r["concurrency"], r["tokens"], r["seconds"]) for r in rows)
    return ", ".join(f"{lv.k}: {lv.samples}× x={lv.x:.2f} {lv.aggregate_tps:.0f} tok/s" for lv in levels.values())


def test_samples_are_the_stored_token_counts(conn):
    """The samples measure each reply in the tokens the worker stored with it (the server's count, or
    `reply_tokens`' estimate); a reply stored without any (before the worker wrote them) is no sample."""
    sim = SimServer(SimConfig(name="a", models=[ModelSpec("m1", 1 * GB, parallel=2)], preloaded="all")).start()
    try:
        register_sims(conn, {"a": sim}, memory_gb=64)
        server_id = state.servers(conn)[0]["id"]
        stored = ({"text": "x" * 40, "tokens": reply_tokens("x" * 40, 3)},
                  {"text": "x" * 40, "tokens": reply_tokens("x" * 40, None)}, {"text": "x" * 40})
        for i, reply in enumerate(stored):
            [jid] = jobs.enqueue_many(conn, [jobs.NewJob(source="t", source_message_id=f"s{i}", entity_id="e",
                                                         model="m1", priority=10, payload={"text": "hi"})])
            claim = jobs.claim(conn, "w", lease_seconds=60, use_slots=True)
            assert claim is not None and claim.job_id == jid
            t0 = datetime.now(timezone.utc)
            assert jobs.store_reply(conn, jid, claim.token, reply, started_at=t0,
                                    generated_at=t0 + timedelta(seconds=1))
            assert jobs.complete(conn, jid, claim.token)
        rows = slots.queries.all(conn, "cluster_concurrency_samples", {
            "server_id": server_id, "window_s": slots.SAMPLE_WINDOW_SECONDS, "limit": slots.SAMPLE_LIMIT})
        assert sorted(r["tokens"] for r in rows) == [3.0, 10.0]     # the server's 3, the estimate's 10
    finally:
        sim.stop()


def pair_slots(conn) -> int:
    return sum(c["free"] + c["held"] for c in state.slot_counts(conn) if c["model"] == "m1")


def test_slots_converge_to_the_simulators_knee(conn, db_url):
    sim = SimServer(SimConfig(name="a", models=[ModelSpec("m1", 1 * GB, parallel=4)], preloaded="all", speed=1.0,
                              ttft_seconds=0.005, prompt_token_seconds=0.0, per_token_seconds=0.016,
                              reply_tokens=25, batch_curve=SATURATING)).start()
    try:
        register_sims(conn, {"a": sim}, memory_gb=64)
        server_id = state.servers(conn)[0]["id"]
        assert pair_slots(conn) == 4

        decisions = []
        for users in (1, 2, 3, 4):   # traffic grows: each level of concurrency gets measured
            peak = [0]
            run_users(db_url, users, PER_USER, f"p{users}", peak)
            assert peak[0] == users, ("the level was really run", peak, curve_of(conn, server_id))
            slots.rebalance(conn, {}, adaptive=True)
            decisions.append(slots.concurrency_decisions(conn, server_id, {"m1": 4})["m1"])
            if users < 4:
                # The full parallel is not measured yet: keep it so it is (levels 1..3 already show
                # the knee here, but a curve can grow again past a flat stretch: test_concurrency.py).
                assert pair_slots(conn) == 4, (decisions[-1], curve_of(conn, server_id))
                assert decisions[-1].reason.startswith("exploring"), (decisions[-1], curve_of(conn, server_id))

        # Neither the third nor the fourth request bought anything: the pair settles at 2.
        assert decisions[-1].slots == 2 and decisions[-1].reason.startswith("knee at 2"), \
            (decisions[-1], curve_of(conn, server_id))
        assert decisions[-1].measured == (1, 2, 3, 4)
        assert pair_slots(conn) == 2

        # Four users again: at most two generations run at once now, the others queue for a slot.
        peak = [0]
        run_users(db_url, 4, 4, "after", peak)
        assert peak[0] == 2
        assert sim.model_stats("m1")["peak_in_flight"] == 4     # it did run 4 while exploring

        # Adaptive concurrency off: the pair gets its full parallel back.
        slots.rebalance(conn, {}, adaptive=False)
        assert pair_slots(conn) == 4
    finally:
        sim.stop()


def test_a_backlog_probes_a_lone_request_and_keeps_one_where_it_is_faster(conn, db_url):
    """Two requests together are slower in total than one alone (a 1-thread CPU server: the real
    llama.cpp servers of bench/real_inference.py were 1.3-1.5 x as fast at one request each). A steady
    backlog keeps both slots busy, so a lone request is never measured by itself: the pair probes at 1,
    measures it, and stays there."""
    sim = SimServer(SimConfig(name="a", models=[ModelSpec("m1", 1 * GB, parallel=2)], preloaded="all", speed=1.0,
                              ttft_seconds=0.005, prompt_token_seconds=0.0, per_token_seconds=0.008,
                              reply_tokens=25, batch_curve=[1.0, 2.8])).start()
    try:
        register_sims(conn, {"a": sim}, memory_gb=64)
        server_id = state.servers(conn)[0]["id"]
        peak = [0]
        run_users(db_url, 2, 2 * PER_USER, "backlog", peak)     # always two in flight
        assert peak[0] == 2
        slots.rebalance(conn, {}, adaptive=True)
        probe = slots.concurrency_decisions(conn, server_id, {"m1": 2})["m1"]
        assert probe.slots == 1 and probe.reason.startswith("probing") and 1 not in probe.measured, \
            (probe, curve_of(conn, server_id))
        assert pair_slots(conn) == 1

        peak = [0]
        run_users(db_url, 2, PER_USER, "probe", peak)            # the same demand, one at a time now
        assert peak[0] == 1
        slots.rebalance(conn, {}, adaptive=True)
        settled = slots.concurrency_decisions(conn, server_id, {"m1": 2}, current={"m1": 1})["m1"]
        assert settled.slots == 1 and settled.reason.startswith("knee at 1") and settled.measured == (1, 2), \
            (settled, curve_of(conn, server_id))
        assert pair_slots(conn) == 1
    finally:
        sim.stop()


def test_a_linear_server_keeps_its_parallel(conn, db_url):
    sim = SimServer(SimConfig(name="a", models=[ModelSpec("m1", 1 * GB, parallel=3)], preloaded="all", speed=1.0,
                              ttft_seconds=0.005, prompt_token_seconds=0.0, per_token_seconds=0.004,
                              reply_tokens=25, batch_curve=[1.0, 1.0, 1.0])).start()
    try:
        register_sims(conn, {"a": sim}, memory_gb=64)
        server_id = state.servers(conn)[0]["id"]
        for users in (1, 2, 3):
            run_users(db_url, users, PER_USER, f"p{users}", [0])
        slots.rebalance(conn, {}, adaptive=True)
        d = slots.concurrency_decisions(conn, server_id, {"m1": 3})["m1"]
        assert (d.slots, d.measured) == (3, (1, 2, 3)) and "grows" in d.reason, (d, curve_of(conn, server_id))
        assert pair_slots(conn) == 3
    finally:
        sim.stop()


def test_the_switch_is_read_from_the_config(tmp_path, monkeypatch):
    from aibot.harness import entity, write_config
    from aibot.settings import reset_settings

    def config(name: str, **cluster) -> str:
        return write_config(tmp_path / name, servers=[{"name": "a", "url": "http://127.0.0.1:9"}],
                            entities=[entity("e", "m1")], clusterSettings={"keepModelsLoaded": True, **cluster})

    for path, want in ((config("absent.json"), False), (config("on.json", adaptiveConcurrency=True), True),
                       (config("off.json", adaptiveConcurrency=False), False)):
        monkeypatch.setenv("AIBOT_CONFIG", path)
        reset_settings()
        assert slots.adaptive_enabled() is want, path
    monkeypatch.setenv("AIBOT_CONFIG", str(tmp_path / "missing.json"))
    reset_settings()
    assert slots.adaptive_enabled() is False


def test_a_bad_switch_names_the_field():
    from aibot.config.models import ClusterSettings

    with pytest.raises(ValueError, match="adaptiveConcurrency|adaptive_concurrency"):
        ClusterSettings.model_validate({"adaptiveConcurrency": "sometimes"})
