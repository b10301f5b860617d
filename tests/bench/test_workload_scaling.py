"""bench/workload.py's fair-time rule: aibot's scheduling durations are its production defaults × the
simulator speed, in forms aibot's own parsers accept (a settings value, a schedule, clusterSettings).
Without it the trace would compare a 600-simulated-second aging against peers with none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import workload  # noqa: E402

from aibot.config.models import ClusterSettings  # noqa: E402
from aibot.scheduler.runner import parse_schedule  # noqa: E402
from aibot.settings import Settings  # noqa: E402


@pytest.mark.parametrize("speed", [0.05, 0.2, 1.0])
def test_scaled_settings_are_production_times_speed_and_parse(speed):
    env, cluster = workload.scaled_settings(speed)
    settings = Settings.from_sources(environ=env)
    assert settings.aging_seconds == pytest.approx(30.0 * speed)
    for job, production in (("refresh", 15.0), ("rebalance", 30.0), ("doorbell", 5.0)):
        trigger = parse_schedule(env[f"AIBOT_SCHEDULE_{job.upper()}"])
        assert trigger.interval.total_seconds() == pytest.approx(production * speed, rel=1e-3)
    cs = ClusterSettings.model_validate(cluster)
    assert cs.min_residency_seconds == pytest.approx(120.0 * speed)
    assert cs.min_residency_floor_seconds == pytest.approx(5.0 * speed)
    assert cs.model_unload_delay_ms == int(300_000 * speed)


def test_unanswered_requests_get_both_percentiles():
    # Two answered (1 s and 3 s after arrival), one never answered (its wait runs to the end, 10 s).
    called = {"a": 0.0, "b": 0.0, "c": 0.0}
    done = {"a": 1.0, "b": 3.0}
    stats = [{"models": {}, "memory": {"peak_bytes": 0, "budget_bytes": 1, "refusals": 0}}]
    row = workload.summarise("x", stats, called, {k: "m" for k in called}, done, 0.0, 10.0, 1.0)
    assert row["not_answered"] == 1 and row["replies"] == 2
    assert row["unanswered_oldest_wait_s"] == pytest.approx(10.0)
    assert row["wait_answered_p99_s"] <= 3.0 < row["wait_p99_s"]


def test_places_follow_the_memory_formula():
    # 128 GB, 8 GB reserve, 12 GB safety: 6 × 15 GB leave 18 GB = 6 request buffers of 3 GB, one per
    # resident; a seventh would leave one buffer for seven models.
    assert workload.places_per_server(15.0) == 6
    assert workload.places_per_server(8.0) > workload.places_per_server(15.0) > workload.places_per_server(30.0)


def test_clairvoyant_cache_evicts_the_model_needed_last():
    events = [(float(i), m) for i, m in enumerate("ABCABC")]
    # A, B load; C evicts B (needed after A); A hits; B evicts A (never needed again); C hits: 4 loads.
    # LRU would miss all six.
    assert workload.clairvoyant_loads(events, places=2, window_s=0) == 4
    assert workload.clairvoyant_loads(events, places=3, window_s=0) == 3


def test_clairvoyant_batches_requests_within_the_window_of_their_batch():
    events = [(0.0, "A"), (5.0, "B"), (10.0, "A"), (20.0, "A")]
    assert workload.clairvoyant_loads(events, places=1, window_s=15) == 3    # A@0 (+A@10), B, A@20
    assert workload.clairvoyant_loads(events, places=1, window_s=25) == 2    # A@0 (+10, +20), B
