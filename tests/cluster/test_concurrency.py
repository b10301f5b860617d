"""The knee of a (server, model)'s throughput curve, decided from made-up samples (pure)."""

from __future__ import annotations

import random

import pytest

from aibot.cluster import concurrency
from aibot.cluster.concurrency import Sample, curve, knee
from aibot.cluster.placement import server_targets
from aibot.cluster.sizing import Budget, Instance


def samples_for(throughput, levels, n=10, tokens=100.0, noise=0.0, seed=1):
    """n generations at each level k whose aggregate tokens/s is throughput(k) (× a noise factor)."""
    rng = random.Random(seed)
    out = []
    for k in levels:
        for _ in range(n):
            x = k + rng.uniform(-0.3, 0.3)          # k requests keep about k in flight
            rate = throughput(k) / x * (1 + rng.uniform(-noise, noise))
            out.append(Sample(concurrency=x, tokens=tokens, seconds=tokens / rate))
    return out


def decide(throughput, levels, parallel, **kw):
    return knee(curve(samples_for(throughput, levels, **{k: v for k, v in kw.items() if k in ("n", "noise", "seed")})),
                parallel, **{k: v for k, v in kw.items() if k in ("min_gain", "min_samples")})


def test_linear_curve_keeps_parallel():
    d = decide(lambda k: 20.0 * k, range(1, 9), 8)
    assert d.slots == 8 and "grows" in d.reason


def test_saturating_curve_settles_at_two():
    # +80 % for the second request, then +4 % and +2 % of a lone request's rate: not worth a slot.
    t = {1: 20.0, 2: 36.0, 3: 36.8, 4: 37.2}
    d = decide(t.__getitem__, range(1, 5), 4)
    assert d.slots == 2, d.reason
    assert d.measured == (1, 2, 3, 4)


def test_throughput_that_falls_past_the_knee_settles_there():
    t = {1: 20.0, 2: 34.0, 3: 40.0, 4: 38.0, 5: 36.0, 6: 35.0}
    assert decide(t.__getitem__, range(1, 7), 6).slots == 3


def test_gain_is_measured_against_a_lone_request_not_the_total():
    # Linear up to 12: +1/11 of the total at 12 (< 10 %) but a whole lone request's rate: kept.
    assert decide(lambda k: 5.0 * k, range(1, 13), 12).slots == 12


def test_noisy_saturating_curve_finds_the_knee():
    t = {1: 20.0, 2: 38.0, 3: 39.0, 4: 39.5}
    for seed in range(5):
        assert decide(t.__getitem__, range(1, 5), 4, noise=0.05, seed=seed, n=30).slots == 2


def test_a_noisy_dip_does_not_settle_a_growing_pair():
    # Level 3 measured low, level 4 well above it: the curve still grows, so no knee at 2 or 3.
    t = {1: 20.0, 2: 38.0, 3: 38.5, 4: 70.0}
    assert decide(t.__getitem__, range(1, 5), 4).slots == 4


def test_too_few_samples_keeps_parallel():
    t = {1: 20.0, 2: 36.0, 3: 36.5, 4: 36.6}
    d = decide(t.__getitem__, range(1, 5), 4, n=3)
    assert d.slots == 4 and d.reason.startswith("exploring")
    assert knee({}, 4).slots == 4


def test_unmeasured_parallel_keeps_parallel_so_it_gets_measured():
    # Grows from 1 to 2, nothing known at 4: explore at full parallel rather than stop at 2.
    d = decide({1: 20.0, 2: 38.0}.__getitem__, range(1, 3), 4)
    assert d.slots == 4 and "at 4 in flight" in d.reason


def test_a_flat_start_does_not_cap_before_parallel_is_measured():
    # The shape a real llama.cpp server on 2 CPU cores showed (bench/adaptive_real.py, tokens/s by
    # level): flat from 1 to 3, 1.6 x at 6. Levels 1..3 alone look like a knee at 1.
    t = {1: 58.3, 2: 58.3, 3: 57.7, 4: 63.6, 5: 75.0, 6: 92.9}
    early = decide(t.__getitem__, range(1, 4), 6)
    assert early.slots == 6 and early.reason.startswith("exploring"), early.reason
    assert decide(t.__getitem__, range(1, 7), 6).slots == 6


def test_a_lone_request_must_be_measured_before_a_cap():
    # Saturated from 2 on, but the reference rate of one request is unknown: no knee yet.
    t = {2: 36.0, 3: 36.5, 4: 36.6}
    d = decide(t.__getitem__, range(2, 5), 4)
    assert not d.reason.startswith("knee") and "at 1 in flight" in d.reason


def test_a_backlog_that_never_runs_one_alone_is_probed_at_one():
    # The full parallel is measured, a lone request never was (every slot stayed busy): one request
    # at a time until it is, then the rule decides from both ends.
    t = {1: 110.0, 2: 78.0}          # a real 1-thread llama.cpp server (bench/real_inference.py)
    d = decide(t.__getitem__, [2], 2)
    assert d.slots == 1 and d.reason.startswith("probing") and d.measured == (2,), d
    settled = decide(t.__getitem__, [1, 2], 2)
    assert settled.slots == 1 and settled.reason.startswith("knee at 1"), settled
    grows = {1: 50.0, 2: 95.0}
    assert decide(grows.__getitem__, [1, 2], 2).slots == 2


def test_nothing_is_probed_before_the_full_parallel_is_measured():
    t = {2: 36.0, 3: 36.5}
    d = decide(t.__getitem__, [2, 3], 4)
    assert d.slots == 4 and d.reason.startswith("exploring") and "at 1 in flight" in d.reason


def test_a_gap_between_the_ends_still_compares_the_measured_levels():
    # Levels 1, 2 and 4 measured, 3 not: 2 -> 4 bought nothing, so 2 is the knee.
    t = {1: 20.0, 2: 38.0, 4: 38.5}
    d = decide(t.__getitem__, (1, 2, 4), 4)
    assert d.slots == 2 and d.measured == (1, 2, 4), d.reason


def test_never_above_parallel():
    t = {1: 20.0, 2: 40.0, 3: 60.0, 4: 61.0}
    assert decide(t.__getitem__, range(1, 5), 2).slots == 2
    assert knee({}, 1).slots == 1


def test_samples_weigh_by_their_length():
    levels = curve([Sample(1, 100, 10), Sample(1.2, 10, 0.01), Sample(0.6, 100, 10)])
    assert set(levels) == {1}
    assert levels[1].per_request_tps == pytest.approx(210 / 20.01)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="parallel"):
        knee({}, 0)
    with pytest.raises(ValueError, match="min_gain"):
        knee({}, 4, min_gain=1.5)
    with pytest.raises(ValueError, match="min_samples"):
        knee({}, 4, min_samples=0)


def test_caps_per_model():
    flat = samples_for({1: 20.0, 2: 36.0, 3: 36.2, 4: 36.3}.__getitem__, range(1, 5))
    out = concurrency.caps({"a": flat}, {"a": 4, "b": 4})
    assert out["a"].slots == 2 and out["b"].slots == 4


def test_server_targets_give_a_capped_models_slots_to_the_others():
    budget = Budget(memory_bytes=None)
    instances = [Instance("a", 1, parallel=4), Instance("b", 1, parallel=4)]
    assert server_targets(budget, instances, {"a": 10, "b": 10}) == {"a": 4, "b": 4}
    assert server_targets(budget, instances, {"a": 10, "b": 10}, caps={"a": 2}) == {"a": 2, "b": 4}
    # A cap never raises a model above its parallel.
    assert server_targets(budget, instances, {"a": 10}, caps={"a": 9})["a"] == 4


def test_the_current_cap_is_kept_while_it_is_still_a_knee():
    # Both 2 and 3 qualify; a pair capped at 3 stays there (its own samples move its estimate: no
    # flapping), a pair at its parallel goes to the smallest knee.
    t = {1: 20.0, 2: 36.0, 3: 37.0, 4: 37.2}
    levels = curve(samples_for(t.__getitem__, range(1, 5)))
    assert knee(levels, 4).slots == 2
    assert knee(levels, 4, current=3).slots == 3
    assert knee(levels, 4, current=4).slots == 2
    # A current cap that is no knee any more (the curve grows past it) gives way.
    grown = curve(samples_for({1: 20.0, 2: 36.0, 3: 37.0, 4: 60.0}.__getitem__, range(1, 5)))
    assert knee(grown, 4, current=2).slots == 4


def test_a_cap_near_the_bar_does_not_flip_back_to_parallel():
    # 2 -> 4 adds 12 % of a lone request's rate per added request: just over the 10 % bar, so an
    # uncapped pair keeps its parallel, but a pair capped at 2 keeps its cap (under 1.5 x the bar).
    t = {1: 20.0, 2: 36.0, 3: 38.4, 4: 40.8}
    levels = curve(samples_for(t.__getitem__, range(1, 5)))
    assert knee(levels, 4).slots == 4
    assert knee(levels, 4, current=2).slots == 2
