"""Pure placement rules: fair slot split, slot-row edits, server choice and eviction order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aibot.cluster.placement import (
    slots_gained,
    ModelShare,
    Placement,
    Refusal,
    Resident,
    ServerView,
    SlotChange,
    choose_server,
    evictable,
    room_for,
    server_slot_changes,
    server_targets,
    slot_changes,
    split_slots,
)
from aibot.cluster.sizing import GB, Budget, Instance, server_slots

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
LONG_AGO = NOW - timedelta(hours=1)


# --- split ------------------------------------------------------------------------------------------

def test_split_gives_each_model_its_parallel_when_total_allows():
    shares = [ModelShare("a", 4), ModelShare("b", 2)]
    assert split_slots(6, shares) == {"a": 4, "b": 2}
    assert split_slots(12, shares) == {"a": 4, "b": 2}   # never above parallel


def test_split_round_robins_when_memory_bound_is_lower():
    shares = [ModelShare("a", 4), ModelShare("b", 4), ModelShare("c", 4)]
    assert split_slots(5, shares) == {"a": 2, "b": 2, "c": 1}


def test_split_every_model_gets_one_before_demand_gets_more():
    shares = [ModelShare("a", 4, demand=10), ModelShare("b", 4), ModelShare("c", 4)]
    assert split_slots(3, shares) == {"a": 1, "b": 1, "c": 1}
    # The fourth and fifth slots go to the model with queued work.
    assert split_slots(5, shares) == {"a": 3, "b": 1, "c": 1}


def test_split_prefers_demand_when_not_everyone_can_have_one():
    shares = [ModelShare("a", 4), ModelShare("b", 4, demand=1), ModelShare("c", 4, demand=3)]
    assert split_slots(2, shares) == {"a": 0, "b": 1, "c": 1}


def test_split_uncovered_demand_fewest_slots_first():
    shares = [ModelShare("a", 8, demand=5), ModelShare("b", 8, demand=5), ModelShare("c", 8)]
    assert split_slots(7, shares) == {"a": 3, "b": 3, "c": 1}


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="total slots"):
        split_slots(-1, [])
    with pytest.raises(ValueError, match="duplicate"):
        split_slots(1, [ModelShare("a", 1), ModelShare("a", 1)])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.lists(st.tuples(st.integers(1, 8), st.integers(0, 10)), max_size=8))
def test_property_split_is_fair_and_complete(total, specs):
    shares = [ModelShare(f"m{i}", p, d) for i, (p, d) in enumerate(specs)]
    alloc = split_slots(total, shares)
    assert sum(alloc.values()) == min(total, sum(s.parallel for s in shares))
    assert all(0 <= alloc[s.model] <= s.parallel for s in shares)
    if total >= len(shares):
        assert all(alloc[s.model] >= 1 for s in shares)


def test_server_targets_split_the_sizing_result_and_zero_non_serving():
    budget = Budget(64 * GB)
    instances = [Instance("a", 15 * GB, 4), Instance("b", 15 * GB, 4), Instance("c", 5 * GB, 2, state="loading")]
    # 64 − 8 − 35 − 5.6 = 15.4 GB → 5 buffers; split a/b, c gets none while loading.
    assert server_slots(budget, instances).slots == 5
    assert server_targets(budget, instances, {"b": 3}) == {"a": 2, "b": 3, "c": 0}


# --- slot row edits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target,free,held,retired,expected", [
    (4, 0, 0, 0, SlotChange(add=4)),
    (4, 2, 2, 0, SlotChange()),
    (2, 3, 1, 0, SlotChange(delete_free=2)),
    (1, 1, 3, 0, SlotChange(delete_free=1, retire=2)),
    (0, 2, 2, 1, SlotChange(delete_free=2, retire=2)),
    (5, 1, 1, 2, SlotChange(add=1, unretire=2)),
    (3, 1, 1, 2, SlotChange(unretire=1)),
])
def test_slot_changes(target, free, held, retired, expected):
    assert slot_changes(target, free, held, retired) == expected


@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.integers(0, 20))
def test_property_slot_changes_reach_target_without_touching_held_rows(target, free, held, retired):
    c = slot_changes(target, free, held, retired)
    active_after = free - c.delete_free + c.add + held - c.retire + c.unretire
    assert active_after == target
    assert c.delete_free <= free and c.retire <= held and c.unretire <= retired
    assert not (c.add and c.delete_free)


# --- placement and eviction ---------------------------------------------------------------------------

def server(name, ram_gb, residents=(), sid=None, **kw) -> ServerView:
    return ServerView(sid or hash(name) % 1000, name, Budget(ram_gb * GB if ram_gb else None), tuple(residents), **kw)


def res(model, size_gb, *, held=0, loaded=LONG_AGO, used=LONG_AGO, state="loaded", parallel=1) -> Resident:
    return Resident(model, size_gb * GB, parallel, state, held, loaded, used)


def test_choose_prefers_most_free_memory():
    a = server("a", 128, [res("x", 15)])
    b = server("b", 128, [res("y", 30)])
    placement = choose_server([a, b], "new", 15 * GB, now=NOW)
    assert isinstance(placement, Placement)
    assert (placement.name, placement.evict) == ("a", ())
    # 128 − 8 − 30 − 12 = 78 GB free for buffers after the load.
    assert placement.free_bytes_after == 78 * GB


def test_choose_skips_servers_already_holding_or_ineligible():
    a = server("a", 128, [res("new", 15)])
    b = server("b", 256, can_load=False)
    c = server("c", 64)
    assert choose_server([a, b, c], "new", 15 * GB, now=NOW).name == "c"
    refusal = choose_server([a, b], "new", 15 * GB, now=NOW)
    assert isinstance(refusal, Refusal)
    assert "already holds new" in str(refusal) and "b: not eligible" in str(refusal)


def test_room_counts_requests_in_flight():
    # 128 GB with 5 × 15 GB: after a sixth, 18 GB → 6 buffers. 6 held + 1 new = 7 > 6: no room,
    # and none of the busy models may be evicted.
    busy = [res(f"m{i}", 15, held=1 if i else 5) for i in range(5)]
    full = server("a", 128, busy)
    assert room_for(full, 15 * GB, now=NOW) is None
    # With only 5 in flight there is room for the sixth model and one request for it.
    lighter = server("a", 128, [res(f"m{i}", 15, held=1) for i in range(5)])
    assert room_for(lighter, 15 * GB, now=NOW) == ()


def test_evicts_idle_least_recently_used_first():
    s = server("a", 64, [
        res("old", 15, used=NOW - timedelta(minutes=50)),
        res("recent", 15, used=NOW - timedelta(minutes=5)),
        res("busy", 15, held=1, used=NOW - timedelta(hours=2)),
    ])
    # 64 − 8 − 5.6 = 50.4 GB for models + buffers; 45 GB resident leaves no room for 10 GB more
    # (the new model's request and the busy one's need 2 × 3 GB).
    assert [r.model for r in evictable(s, now=NOW)] == ["old", "recent"]
    assert room_for(s, 10 * GB, now=NOW) == ("old",)
    # Needing more memory evicts the next LRU model too, never the busy one.
    assert room_for(s, 25 * GB, now=NOW) == ("old", "recent")
    assert room_for(s, 40 * GB, now=NOW) is None


def test_minimum_residency_protects_fresh_models():
    s = server("a", 64, [res("fresh", 40, loaded=NOW - timedelta(seconds=30), used=NOW - timedelta(seconds=30))])
    assert room_for(s, 15 * GB, now=NOW) is None
    assert room_for(s, 15 * GB, now=NOW, min_residency_s=10) == ("fresh",)


def test_models_with_queued_demand_are_evicted_last():
    s = server("a", 64, [res("wanted", 15, used=NOW - timedelta(hours=3)), res("idle", 15)])
    assert [r.model for r in evictable(s, now=NOW, demand={"wanted": 2})] == ["idle", "wanted"]


def test_loading_and_unloading_models_are_never_victims_but_count_memory():
    s = server("a", 64, [res("l", 20, state="loading"), res("u", 20, state="unloading")])
    assert evictable(s, now=NOW) == []
    assert room_for(s, 15 * GB, now=NOW) is None


def test_choose_prefers_no_eviction_then_fewest_evictions():
    needs_one = server("a", 64, [res("x", 40)])
    needs_two = server("b", 64, [res("y", 20), res("z", 20)])
    placement = choose_server([needs_two, needs_one], "new", 30 * GB, now=NOW)
    assert (placement.name, placement.evict) == ("a", ("x",))
    roomy = server("c", 128)
    assert choose_server([needs_two, needs_one, roomy], "new", 30 * GB, now=NOW).evict == ()


def test_unknown_ram_server_is_a_last_resort_without_eviction():
    unknown = server("u", None, [res("x", 100)])
    known = server("k", 64)
    assert choose_server([unknown, known], "new", 15 * GB, now=NOW).name == "k"
    assert choose_server([unknown], "new", 15 * GB, now=NOW).name == "u"


def test_server_changes_wait_for_in_flight_requests_before_adding():
    # Capacity fell to 1 while "m" has 3 requests in flight: "big" gets its row only once they finish.
    changes = server_slot_changes(1, {"m": 0, "big": 1}, {"m": (1, 3, 0)})
    assert changes["m"] == SlotChange(delete_free=1, retire=3)
    assert changes["big"] == SlotChange()
    assert server_slot_changes(1, {"m": 0, "big": 1}, {"m": (0, 0, 0)})["big"] == SlotChange(add=1)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 16), st.dictionaries(st.sampled_from("abcde"), st.integers(0, 8)),
       st.dictionaries(st.sampled_from("abcde"), st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6))))
def test_property_server_rows_never_exceed_total_unless_held(total, targets, counts):
    changes = server_slot_changes(total, targets, counts)
    rows_after = 0
    for m, c in changes.items():
        free, held, retired = counts.get(m, (0, 0, 0))
        rows_after += free - c.delete_free + c.add + held + retired
        assert c.delete_free <= free and c.retire <= held and c.unretire <= retired
        assert free - c.delete_free + c.add + held - c.retire + c.unretire <= max(targets.get(m, 0), held)
    rows_before = sum(f + h + r for f, h, r in counts.values())
    assert rows_after <= max(total, rows_before)       # never grows past the total
    if any(c.add for c in changes.values()):
        assert rows_after <= total                     # rows are added only into real room


def test_placement_prefers_the_server_where_the_model_gets_more_slots():
    budget = Budget(memory_bytes=128 * GB)
    serial = ServerView(1, "serial", budget, (res("a", 15, parallel=1),))
    batched = ServerView(2, "batched", budget, (res("b", 15, parallel=4), res("c", 15, parallel=4)))
    assert (serial.expected_parallel, batched.expected_parallel) == (1, 4)
    # `serial` has more free memory, but the model would get 4 slots on `batched` and 1 on `serial`.
    choice = choose_server([serial, batched], "new", 15 * GB, now=NOW)
    assert choice.name == "batched"
    assert slots_gained(batched, 15 * GB, ()) == 4 and slots_gained(serial, 15 * GB, ()) == 1


def test_a_full_server_gains_nothing_so_the_model_goes_elsewhere():
    budget = Budget(memory_bytes=128 * GB, hard_cap=12)
    full = ServerView(1, "full", budget, tuple(res(m, 15, parallel=4) for m in "abc"))   # 12 slots: at the cap
    other = ServerView(2, "other", budget, (res("d", 15, parallel=1),))
    assert slots_gained(full, 15 * GB, ()) == 0
    assert choose_server([full, other], "new", 15 * GB, now=NOW).name == "other"


def test_empty_servers_fall_back_to_their_configured_parallel():
    budget = Budget(memory_bytes=128 * GB)
    one = ServerView(1, "one", budget, default_parallel=1)
    four = ServerView(2, "four", budget, default_parallel=4)
    assert choose_server([one, four], "new", 15 * GB, now=NOW).name == "four"


def test_loading_never_leaves_a_resident_model_without_a_slot():
    # 128 GB, 8 GB reserve, 12 GB safety: six 15 GB models leave 18 GB = 6 buffers, one per model.
    budget = Budget(memory_bytes=128 * GB)
    six = ServerView(1, "s", budget, tuple(res(f"m{i}", 15) for i in range(6)))
    assert room_for(six, 15 * GB, now=NOW) is not None, "a 7th would leave 1 buffer for 7 models: evict"
    assert room_for(six, 15 * GB, now=NOW) != ()
    five = ServerView(1, "s", budget, tuple(res(f"m{i}", 15) for i in range(5)))
    assert room_for(five, 15 * GB, now=NOW) == (), "a 6th still leaves one buffer per model"


# --- the server's own eviction bound, refusals per pair, and refusals that show their arithmetic ----

def test_a_server_that_evicts_by_itself_gets_an_idle_victim_from_us_first():
    # A router with --models-max 2 would evict its LRU model itself, perhaps one with work in flight.
    busy, idle = res("busy", 1, held=1), res("idle", 1)
    s = server("r", 128, [busy, idle], max_models=2)
    assert room_for(s, GB, now=NOW) == ("idle",)
    s_all_busy = server("r", 128, [busy, res("busy2", 1, held=1)], max_models=2)
    assert room_for(s_all_busy, GB, now=NOW) is None
    refusal = choose_server([s_all_busy], "new", GB, now=NOW, size_source="reported by server r")
    assert "keeps at most 2 model(s)" in refusal.reasons["r"] and "busy, busy2" in refusal.reasons["r"]


def test_a_blocked_pair_is_skipped_with_its_reason():
    a = server("a", 128, blocked={"m": "refused: the server offers no model named 'm'"})
    b = server("b", 64)
    assert choose_server([a, b], "m", 15 * GB, now=NOW).name == "b"
    refusal = choose_server([a], "m", 15 * GB, now=NOW)
    assert refusal.reasons == {"a": "refused: the server offers no model named 'm'"}


def test_no_room_names_every_number_and_its_source():
    s = server("small", 25, [res("other", 10, held=1)], memory_source="config")
    refusal = choose_server([s], "m", 15 * GB, now=NOW,
                            size_source='assumed: no server reported its size and the config has no models["m"].sizeGB')
    why = refusal.reasons["small"]
    assert why.startswith("not enough memory even after evicting idle models")
    for part in ("needs 15GB (assumed: no server reported its size", "RAM 25GB (config)", "system reserve 8GB",
                 "safety 1.7GB", "resident models 10GB", "= 5.3GB free", "idle models that may be evicted: none",
                 "busy or recently loaded: other"):
        assert part in why, (part, why)


def test_minimum_residency_scales_with_the_load_time():
    from aibot.cluster.placement import MIN_RESIDENCY_FLOOR_SECONDS, min_residency

    assert min_residency(1.4) == 14.0                        # a 270M model that loads in 1.4 s
    from aibot.cluster.placement import DEFAULT_MIN_RESIDENCY_SECONDS

    assert min_residency(30.0) == DEFAULT_MIN_RESIDENCY_SECONDS   # a 15 GB f16 model: the cap
    assert min_residency(0.1) == MIN_RESIDENCY_FLOOR_SECONDS and min_residency(None) == DEFAULT_MIN_RESIDENCY_SECONDS
    quick = Resident("quick", GB, loaded_at=NOW - timedelta(seconds=20), load_seconds=1.0)
    slow = Resident("slow", GB, loaded_at=NOW - timedelta(seconds=20), load_seconds=30.0)
    assert [r.model for r in evictable(server("s", 128, [quick, slow]), now=NOW)] == ["quick"]
