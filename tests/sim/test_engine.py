"""Pure parts of the simulator: timing formulas, fault choice, reply planning, config validation."""

from __future__ import annotations

import json
import time

import pytest

from aibot.sim.apis.ollama import parse_keep_alive
from aibot.sim.catalog import GB, CatalogError, ModelSpec, as_catalog, uniform_catalog
from aibot.sim.cluster import ClusterSpec, seed_spec
from aibot.sim.config import DEFAULT_BATCH_ALPHA, SimConfig, SimConfigError
from aibot.sim.engine import (Engine, InsufficientMemory, LoadFailed, ModelLimit, NotLoaded, UnknownModel,
                              batch_multiplier, fits, lmstudio_refusal_message, load_seconds, slot_context,
                              tokens_per_step)
from aibot.sim.faults import FaultConfig, FaultConfigError, FaultSchedule, choose_fault
from aibot.sim.replies import count_tokens, plan_reply, prompt_tokens, token_ids


def test_load_time_is_proportional_to_size_and_scaled_by_speed():
    assert load_seconds(15 * GB, 2.0, 0.0, 1.0) == pytest.approx(30.0)
    assert load_seconds(30 * GB, 2.0, 0.0, 1.0) == pytest.approx(2 * load_seconds(15 * GB, 2.0, 0.0, 1.0))
    assert load_seconds(15 * GB, 2.0, 0.5, 0.01) == pytest.approx(0.305)


def test_default_curve_makes_four_concurrent_take_1_4_times_one():
    assert batch_multiplier(1, DEFAULT_BATCH_ALPHA) == 1.0
    assert batch_multiplier(4, DEFAULT_BATCH_ALPHA) == pytest.approx(1.4)
    # throughput still grows with k: k requests per multiplier
    assert 4 / batch_multiplier(4, DEFAULT_BATCH_ALPHA) > 2 / batch_multiplier(2, DEFAULT_BATCH_ALPHA) > 1


def test_explicit_curve_wins_and_extends_linearly():
    curve = [1.0, 1.1, 1.3]
    assert batch_multiplier(2, 0.5, curve) == 1.1
    assert batch_multiplier(5, 0.5, curve) == pytest.approx(1.7)
    assert batch_multiplier(0, 0.5, curve) == 1.0


def test_tokens_per_step_batches_tiny_sleeps():
    assert tokens_per_step(0.025, 0.002, 100) == 1
    assert tokens_per_step(0.0001, 0.002, 100) == 20
    assert tokens_per_step(0.0001, 0.002, 7) == 7
    assert tokens_per_step(0.0, 0.002, 9) == 9
    assert tokens_per_step(0.01, 0.002, 0) == 0


def test_memory_fit_and_refusal_text_match_what_the_bot_looks_for():
    assert fits(90 * GB, 15 * GB, 128 * GB)
    assert not fits(120 * GB, 15 * GB, 128 * GB)
    assert fits(10**15, 1, None)
    msg = lmstudio_refusal_message(15 * GB, 120 * GB, 128 * GB)
    for needle in ("insufficient system resources", "overload your system", "requires approximately"):
        assert needle in msg
    assert "15.00 GB" in msg and "8.00 GB" in msg


def test_fault_ranges_follow_the_rates():
    cfg = FaultConfig(error_rate=0.1, html_rate=0.2)
    assert choose_fault(cfg, 0.05) == "error"
    assert choose_fault(cfg, 0.15) == "html"
    assert choose_fault(cfg, 0.35) is None


def test_fault_schedule_is_deterministic_and_scripts_come_first():
    a = FaultSchedule(FaultConfig(error_rate=0.3), seed=42)
    b = FaultSchedule(FaultConfig(error_rate=0.3), seed=42)
    seq_a = [a.draw(chat=True) for _ in range(100)]
    assert seq_a == [b.draw(chat=True) for _ in range(100)]
    assert 15 < seq_a.count("error") < 45
    s = FaultSchedule(FaultConfig(script=["html", "none", "malformed"]), seed=1)
    assert [s.draw(chat=True) for _ in range(4)] == ["html", None, "malformed", None]
    assert s.injected == {"html": 1, "malformed": 1}
    # non-chat endpoints only see faults with scope "all", and never body-shape ones
    n = FaultSchedule(FaultConfig(script=["malformed"], scope="all"), seed=1)
    assert n.draw(chat=False) == "error"
    assert FaultSchedule(FaultConfig(error_rate=1.0), seed=1).draw(chat=False) is None


@pytest.mark.parametrize("data, field", [
    ({"error_rate": 1.5}, "faults.error_rate"),
    ({"error_rate": 0.6, "html_rate": 0.6}, "add up"),
    ({"outage_mode": "explode"}, "faults.outage_mode"),
    ({"script": ["boom"]}, "faults.script[0]"),
    ({"outage_windows": [[1]]}, "faults.outage_windows[0]"),
    ({"bogus": 1}, "bogus"),
])
def test_fault_config_errors_name_the_field(data, field):
    with pytest.raises(FaultConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        FaultConfig.from_dict(data)


def test_reply_plan_is_deterministic_and_usage_matches_text():
    msgs = [{"role": "system", "content": "You are X."}, {"role": "user", "content": "How is the weather today?"}]
    p = plan_reply("pub/model-a", msgs, 7, reply_tokens=30)
    assert p == plan_reply("pub/model-a", msgs, 7, reply_tokens=30)
    assert p.text.startswith("model-a reply 7: How is the weather today.")
    assert p.completion_tokens == 30 == count_tokens(p.text)
    assert p.finish_reason == "stop"
    assert prompt_tokens(msgs) == count_tokens("You are X.") + count_tokens("How is the weather today?") + 8


def test_reply_plan_max_tokens_stop_skip_and_human_tail():
    msgs = [{"role": "user", "content": "hello"}]
    short = plan_reply("m", msgs, 1, reply_tokens=30, max_tokens=5)
    assert short.completion_tokens == 5 and short.finish_reason == "length"
    assert plan_reply("m", [{"role": "user", "content": "[sim:skip] hi"}], 1, reply_tokens=30).text == "[SKIP]"
    tail = plan_reply("m", msgs, 1, reply_tokens=10, human_tail=True)
    assert tail.text.endswith("\nHuman: What do you think?")
    cut = plan_reply("m", msgs, 1, reply_tokens=10, human_tail=True, stop=["\nHuman:"])
    assert "Human" not in cut.text and cut.text == tail.text.split("\nHuman:")[0]
    assert len(token_ids("a b c")) == 3


def test_keep_alive_durations():
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive(-1) is None
    assert parse_keep_alive("-1m") is None
    assert parse_keep_alive(12.5) == 12.5
    with pytest.raises(ValueError, match="invalid duration"):
        parse_keep_alive("soon")


@pytest.mark.parametrize("kwargs, field", [
    ({"api": "vllm"}, "SimConfig.api"),
    ({"speed": 0}, "SimConfig.speed"),
    ({"parallel": 0}, "SimConfig.parallel"),
    ({"preloaded": ["nope"]}, r"SimConfig.preloaded\[0\]"),
    ({"lmstudio_version": "0.2"}, "SimConfig.lmstudio_version"),
    ({"memory_bytes": -1}, "SimConfig.memory_bytes"),
    ({"batch_curve": []}, "SimConfig.batch_curve"),
    ({"models_max": -1}, "SimConfig.models_max"),
    ({"sleep_idle_seconds": 0}, "SimConfig.sleep_idle_seconds"),
    ({"broken_models": ["nope"]}, r"SimConfig.broken_models\[0\]"),
    ({"broken_models": ["sim/tiny-1"], "preloaded": ["sim/tiny-1"]}, "also preloaded"),
    ({"model_aliases": {"nope": ["x"]}}, "SimConfig.model_aliases"),
    ({"model_aliases": {"sim/tiny-1": ["sim/tiny-2"]}}, "conflicts with model 'sim/tiny-2'"),
    ({"model_aliases": {"sim/tiny-1": ["t"], "sim/tiny-2": ["t"]}}, "conflicts with model"),
])
def test_sim_config_errors_name_the_field(kwargs, field):
    with pytest.raises(SimConfigError, match=field):
        SimConfig(**kwargs)


def test_catalog_validation_and_shorthand():
    with pytest.raises(CatalogError, match="size_bytes"):
        ModelSpec("x", 0)
    with pytest.raises(CatalogError, match="appears twice"):
        as_catalog([ModelSpec("x", 1), ModelSpec("x", 2)])
    assert ModelSpec.from_dict({"key": "a", "size_gb": 1.5}).size_bytes == int(1.5 * GB)
    with pytest.raises(CatalogError, match="unknown field"):
        ModelSpec.from_dict({"key": "a", "size_gb": 1, "colour": "red"})
    models = uniform_catalog(6, 15)
    assert [m.key for m in models][:2] == ["sim/model-1@f16", "sim/model-2@f16"] and models[0].size_bytes == 15 * GB


def test_seed_spec_shape():
    spec = seed_spec(speed=0.01)
    assert [c.name for c in spec.servers] == ["mac-studio-1", "mac-studio-2"]
    assert [c.parallel for c in spec.servers] == [1, 4]
    assert all(c.memory_bytes == 128 * GB and len(c.catalog) == 6 for c in spec.servers)
    assert all(m.size_bytes == 15 * GB for m in spec.servers[0].catalog.values())


def test_cluster_spec_from_dict_merges_defaults_and_names_errors(tmp_path):
    spec = ClusterSpec.from_dict({
        "defaults": {"speed": 0.5, "models": {"count": 2, "size_gb": 3}},
        "servers": [{"name": "a", "memory_gb": 10}, {"name": "b", "api": "ollama", "faults": {"error_rate": 0.1}}],
    })
    a, b = spec.servers
    assert (a.speed, a.memory_bytes, list(a.catalog)) == (0.5, 10 * GB, ["sim/model-1@f16", "sim/model-2@f16"])
    assert b.api == "ollama" and b.faults.error_rate == 0.1
    with pytest.raises(SimConfigError, match=r"servers\[1\]: unknown field\(s\) colour"):
        ClusterSpec.from_dict({"servers": [{"name": "a"}, {"colour": 1}]})
    with pytest.raises(SimConfigError, match="duplicate name"):
        ClusterSpec.from_dict({"servers": [{"name": "a"}, {"name": "a"}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SimConfigError, match="not valid JSON"):
        ClusterSpec.from_file(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"servers": [{"name": "x", "memory_gb": 4}]}))
    assert ClusterSpec.from_file(good).servers[0].name == "x"


def test_engine_accounting_without_http():
    cfg = SimConfig(models=[ModelSpec("a", 2 * GB), ModelSpec("b", 3 * GB)], memory_bytes=4 * GB,
                    speed=0.001, jit=False)
    eng = Engine(cfg)
    with pytest.raises(UnknownModel):
        eng.acquire("zzz", jit=True)
    with pytest.raises(NotLoaded):
        eng.acquire("a", jit=False)
    inst = eng.load("a", instant=True)
    with pytest.raises(InsufficientMemory):
        eng.load("b", instant=True)
    lease = eng.acquire("a", jit=False)
    assert sum(lease.generate(5)) == 5
    lease.release()
    st = eng.stats()
    assert st["models"]["a"]["served"] == 1 and st["models"]["a"]["peak_in_flight"] == 1
    assert st["models"]["b"]["load_failures"] == 1 and st["memory"]["refusals"] == 1
    assert st["memory"]["used_bytes"] == 2 * GB == st["memory"]["peak_bytes"]
    eng.unload(inst.id)
    assert eng.stats()["memory"]["used_bytes"] == 0 and eng.stats()["models"]["a"]["unloads"] == 1


def test_realistic_defaults_give_about_three_second_replies_and_thirty_second_loads():
    cfg = SimConfig()
    reply = cfg.ttft_seconds + cfg.reply_tokens * cfg.per_token_seconds
    assert 2.5 < reply < 3.5
    assert 25 < load_seconds(15 * GB, cfg.seconds_per_gb, cfg.load_overhead_seconds, cfg.speed) < 40


# ------------------------------------------------------------------ llama.cpp policies (engine.configure)


def test_slot_context_is_n_ctx_split_between_slots_padded_and_capped():
    # llama.cpp src/llama-context.cpp:292-307, tools/server/server-context.cpp n_ctx_slot()
    assert slot_context(4096, 4, 32768) == 1024        # the real router's 1,024 (issue 10, finding 6)
    assert slot_context(8192, 2, 32768) == 4096
    assert slot_context(4096, 3, 32768) == 1536        # 1365 padded up to a multiple of 256
    assert slot_context(65536, 1, 32768) == 32768      # never above the training context
    assert slot_context(4000, 1, 32768) == 4096        # n_ctx itself is padded first


def _llama_engine(sleep_idle_seconds: float | None = None) -> Engine:
    """What the llama.cpp flavours turn on, with --models-max 2."""
    models = [ModelSpec("a", 1 * GB, parallel=2, context_length=4096), ModelSpec("b", 1 * GB),
              ModelSpec("c", 1 * GB), ModelSpec("broken", 1 * GB)]
    eng = Engine(SimConfig(models=models, speed=0.001))
    eng.configure(split_context=True, models_max=2, sleep_idle_seconds=sleep_idle_seconds, broken={"broken": 1})
    return eng


def test_models_max_evicts_the_least_recently_used_idle_model():
    eng = _llama_engine()
    eng.load("a", instant=True)
    eng.load("b", instant=True)
    eng.acquire("a", jit=False).release()          # a is now more recently used than b
    eng.load("c", instant=True)
    assert {i.key for i in eng.instances()} == {"a", "c"}
    st = eng.stats()
    assert st["memory"]["evictions"] == 1 and st["models"]["b"]["unloads"] == 1


def test_models_max_never_evicts_a_busy_model_and_a_load_then_fails():
    eng = _llama_engine()
    eng.load("a", instant=True)
    eng.load("b", instant=True)
    held = [eng.acquire("a", jit=False), eng.acquire("b", jit=False)]
    with pytest.raises(ModelLimit):
        eng.start_load("c")
    for lease in held:
        lease.release()
    eng.start_load("c")
    assert len(eng.instances()) == 2


def test_per_slot_context_on_the_instance():
    eng = _llama_engine()
    inst = eng.load("a", instant=True)
    assert (inst.context_length, inst.parallel, inst.slot_context) == (4096, 2, 2048)
    plain = Engine(SimConfig(models=[ModelSpec("a", GB, context_length=4096)]))
    assert plain.load("a", instant=True).slot_context == 4096      # other flavours: unchanged


def test_broken_model_fails_with_an_exit_code_until_repaired():
    eng = _llama_engine()
    with pytest.raises(LoadFailed) as info:
        eng.load("broken")
    assert info.value.exit_code == 1 and eng.exit_code("broken") == 1 and not eng.instances()
    with pytest.raises(LoadFailed):
        eng.acquire("broken", jit=True)            # autoload tries again and fails again
    assert eng.stats()["models"]["broken"]["load_failures"] == 2
    eng.set_broken("broken", None)
    eng.load("broken", instant=True)
    assert eng.exit_code("broken") is None          # a new load clears the failure


def test_sleeping_frees_memory_and_a_request_wakes_it():
    eng = _llama_engine(sleep_idle_seconds=60)
    eng.load("a", instant=True)
    assert eng.doze() == 0
    assert eng.doze(now=time.time() + 61) == 1
    [inst] = eng.instances()
    assert inst.state == "sleeping" and eng.stats()["memory"]["used_bytes"] == 0
    lease = eng.acquire("a", jit=False)            # resident: no autoload needed to wake it
    assert lease.instance.state == "loaded"
    lease.release()
    st = eng.stats()["models"]["a"]
    assert (st["wakes"], st["loads"], st["served"]) == (1, 1, 1)


def test_a_rejected_request_gives_its_slot_back_without_counting_as_served():
    eng = _llama_engine()
    eng.load("a", instant=True)
    eng.acquire("a", jit=False).reject()
    st = eng.stats()["models"]["a"]
    assert (st["rejected"], st["served"], st["failed"], st["in_flight"]) == (1, 0, 0, 0)
