"""The seed's equation and its tables, reproduced (and, where the seed overcommits, refused)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aibot.cluster.sizing import (
    GB,
    Budget,
    Instance,
    OvercommitError,
    SizingError,
    accounted_bytes,
    check_workers,
    fits,
    server_slots,
)

F16, F32, Q8 = 15 * GB, 30 * GB, 8 * GB


def models(n: int, size: int, parallel: int = 1) -> list[Instance]:
    return [Instance(f"m{i}", size, parallel) for i in range(n)]


def test_seed_scenario_a_128gb_six_f16_models_gives_six():
    budget = Budget(128 * GB)
    result = server_slots(budget, models(6, F16))
    # Seed: 90 GB models + 6 × 3 GB + 8 GB system + 12 GB safety = 116 GB of 128 GB.
    assert budget.safety_bytes == 12 * GB
    assert result.slots == 6
    assert result.memory_bound == 6          # (128 − 8 − 90 − 12) / 3 = 6
    assert accounted_bytes(budget, models(6, F16), 6) == 128 * GB
    assert fits(budget, models(6, F16), 6)


def test_safety_is_a_fraction_of_ram_after_reserve_not_of_total_ram():
    # 10 % of the whole 128 GB would leave (128 − 8 − 90 − 12.8) / 3 = 5.7 → 5, not the seed's 6.
    wrong = Budget(128 * GB, system_reserve_bytes=0, safety_fraction=0.10)
    assert server_slots(Budget(128 * GB), models(6, F16)).slots == 6
    assert wrong.safety_bytes == 12_800_000_000


def test_seed_scenario_b_twenty_workers_with_six_models_is_refused_with_arithmetic():
    with pytest.raises(OvercommitError) as err:
        check_workers(Budget(128 * GB), models(6, F16), 20)
    message = str(err.value)
    assert "20 workers overcommit memory" in message
    assert "models 90GB" in message and "20 requests × 3GB = 60GB" in message
    assert "system 8GB" in message and "safety 12GB" in message and "= 170GB of 128GB" in message
    assert err.value.max_workers == 6
    assert "at most 6 fit" in message
    assert check_workers(Budget(128 * GB), models(6, F16), 6) == 6


def test_parallel_and_hard_cap_bound_the_slots():
    budget = Budget(512 * GB)
    assert server_slots(budget, models(2, Q8, parallel=4)).slots == 8
    assert server_slots(budget, models(2, Q8, parallel=4)).limited_by == "parallel"
    capped = server_slots(budget, models(4, Q8, parallel=4))
    assert (capped.slots, capped.limited_by) == (12, "hard_cap")
    assert server_slots(Budget(512 * GB, hard_cap=20), models(4, Q8, parallel=4)).slots == 16


def test_loading_models_count_memory_but_not_slots():
    budget = Budget(64 * GB)
    loading = [Instance("a", F16, 4), Instance("b", F16, 4, state="loading")]
    result = server_slots(budget, loading)
    assert result.parallel_total == 4
    assert result.models_bytes == 30 * GB
    # 64 − 8 − 30 − 5.6 = 20.4 GB → 6 buffers, but only 4 servable predictions.
    assert (result.memory_bound, result.slots) == (6, 4)


def test_unknown_ram_leaves_parallel_and_cap():
    result = server_slots(Budget(None), models(3, F16, parallel=2))
    assert (result.slots, result.memory_bound, result.free_bytes) == (6, None, None)


def test_no_models_no_slots():
    result = server_slots(Budget(128 * GB), [])
    assert (result.slots, result.limited_by) == (0, "no models")


# The seed's CONFIGURATION MATRIX, one model served per worker (parallel 1, "workers = loaded models").
# (RAM GB, models, size, seed's "safe workers", our slots, what the seed's row gets wrong if anything)
MATRIX = [
    (64, 2, F16, 2, 2, None),
    # 3 f16 + 3 requests: 45 + 9 + 8 system + 5.6 safety = 67.6 GB > 64 GB. Only one buffer fits.
    (64, 3, F16, 3, 1, "seed's upper bound needs 67.6GB of 64GB"),
    (128, 4, F16, 4, 4, None),
    (128, 6, F16, 6, 6, None),
    (192, 8, F16, 8, 8, None),
    # 10 f16: seed's own column says 188 GB (no safety); with the 18.4 GB margin it is 206.4 GB > 192.
    (192, 10, F16, 10, 5, "seed's upper bound needs 206.4GB of 192GB"),
    (256, 12, F16, 12, 12, None),
    # 14 f16: the seed's own "RAM usage" column says 260 GB on a 256 GB machine; also over the hard cap.
    (256, 14, F16, 14, 4, "seed's own column: 260GB of 256GB"),
    (128, 3, F32, 3, 3, None),
    # 4 f32 = 120 GB of models: with system and safety nothing is left; the seed marks it "tight" (144 GB).
    (128, 4, F32, 4, 0, "models alone exceed the budget"),
    # q8_0: seed says 10-12 workers at "110-144GB" on 128 GB; 144 > 128.
    (128, 10, Q8, 10, 9, "10 requests need 130GB of 128GB"),
    (128, 12, Q8, 12, 4, "seed's own column: 144GB of 128GB"),
]


@pytest.mark.parametrize("ram,n,size,seed_workers,ours,finding", MATRIX)
def test_configuration_matrix(ram, n, size, seed_workers, ours, finding):
    budget = Budget(ram * GB)
    instances = models(n, size)
    result = server_slots(budget, instances)
    assert result.slots == ours
    assert fits(budget, instances, result.slots) or result.slots == 0
    if finding is None:
        assert ours == seed_workers
        assert check_workers(budget, instances, seed_workers) == seed_workers
    else:
        # The seed's upper bound overcommits: we cut it, and a request for it is refused.
        assert ours < seed_workers
        with pytest.raises(OvercommitError):
            check_workers(budget, instances, seed_workers)


def test_models_alone_overcommitting_is_reported():
    result = server_slots(Budget(128 * GB), models(4, F32))
    assert result.overcommitted and result.slots == 0 and result.memory_bound == 0


@pytest.mark.parametrize("kwargs,field", [
    ({"memory_bytes": -1}, "memory_bytes"),
    ({"memory_bytes": GB, "safety_fraction": 1.5}, "safety_fraction"),
    ({"memory_bytes": GB, "per_request_bytes": 0}, "per_request_bytes"),
    ({"memory_bytes": GB, "hard_cap": -2}, "hard_cap"),
    ({"memory_bytes": GB, "system_reserve_bytes": -5}, "system_reserve_bytes"),
])
def test_bad_budget_names_the_field(kwargs, field):
    with pytest.raises(SizingError, match=field):
        Budget(**kwargs)


def test_bad_instance_names_model_and_field():
    with pytest.raises(SizingError, match="parallel of model 'x'"):
        Instance("x", GB, parallel=0)
    with pytest.raises(SizingError, match="state of model 'x'"):
        Instance("x", GB, state="gone")
    with pytest.raises(SizingError, match="workers"):
        check_workers(Budget(GB), [], -1)


budgets = st.builds(
    Budget,
    memory_bytes=st.integers(0, 2048 * GB),
    system_reserve_bytes=st.integers(0, 64 * GB),
    safety_fraction=st.floats(0, 0.99, allow_nan=False),
    per_request_bytes=st.integers(1, 16 * GB),
    hard_cap=st.integers(0, 64),
)
instance_lists = st.lists(
    st.builds(Instance, model=st.text(min_size=1, max_size=5), size_bytes=st.integers(0, 200 * GB),
              parallel=st.integers(1, 16), state=st.sampled_from(["loaded", "loading", "unloading"])),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(budgets, instance_lists)
def test_property_slots_never_overcommit(budget, instances):
    result = server_slots(budget, instances)
    assert 0 <= result.slots <= min(budget.hard_cap, result.parallel_total)
    if not result.overcommitted:
        # Accounted = Σ sizes + slots × per-request + reserve + safety <= RAM, exactly (integers).
        assert accounted_bytes(budget, instances, result.slots) <= budget.memory_bytes
        # And the result is the largest such count: one more is over RAM or over another bound.
        more = result.slots + 1
        assert (not fits(budget, instances, more)) or more > min(budget.hard_cap, result.parallel_total)
    else:
        assert result.slots == 0
    # check_workers agrees with the formula's memory term.
    if result.memory_bound is not None and not result.overcommitted:
        assert check_workers(budget, instances, result.memory_bound) == result.memory_bound
        with pytest.raises(OvercommitError):
            check_workers(budget, instances, result.memory_bound + 1)
