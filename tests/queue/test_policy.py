from __future__ import annotations

import math

import pytest

from aibot.queue.policy import (
    DEFAULT_POLICY,
    STRICT_PRIORITY_AGING,
    RetryPolicy,
    backoff_delay,
    failure_outcome,
    overtake_after_seconds,
    validate_aging,
)


class TestBackoffDelay:
    def test_ceiling_doubles_per_failure_until_the_cap(self):
        almost_one = math.nextafter(1.0, 0.0)
        ceilings = [backoff_delay(n, almost_one, base=2.0, cap=300.0) for n in range(1, 11)]
        assert ceilings[:5] == pytest.approx([2, 4, 8, 16, 32])
        assert ceilings[-1] == pytest.approx(300.0)
        assert all(c <= 300.0 for c in ceilings)

    def test_full_jitter_scales_the_ceiling(self):
        assert backoff_delay(3, 0.0, base=2.0, cap=300.0) == 0.0
        assert backoff_delay(3, 0.5, base=2.0, cap=300.0) == pytest.approx(4.0)
        assert backoff_delay(3, 0.25, base=2.0, cap=300.0) == pytest.approx(2.0)

    def test_huge_failure_counts_do_not_overflow(self):
        assert backoff_delay(5000, 0.5, base=2.0, cap=60.0) == pytest.approx(30.0)

    @pytest.mark.parametrize("failures", [0, -1, 1.5, None])
    def test_failures_must_be_positive_int(self, failures):
        with pytest.raises(ValueError, match="failures"):
            backoff_delay(failures, 0.5, base=1.0, cap=2.0)

    @pytest.mark.parametrize("rand", [-0.1, 1.0, 3.0])
    def test_rand_must_be_unit_interval(self, rand):
        with pytest.raises(ValueError, match="rand"):
            backoff_delay(1, rand, base=1.0, cap=2.0)


class TestFailureOutcome:
    def test_job_failure_retries_with_backoff_by_attempt(self):
        out = failure_outcome(attempts=2, max_attempts=3, server_faults=0, max_server_faults=20,
                              server_fault=False, rand=0.5)
        assert out.state == "queued"
        assert out.attempts == 2 and out.server_faults == 0
        assert out.delay_seconds == pytest.approx(0.5 * DEFAULT_POLICY.base_seconds * 2)
        assert out.reason is None

    def test_job_failure_on_last_attempt_is_dead(self):
        out = failure_outcome(attempts=3, max_attempts=3, server_faults=1, max_server_faults=20,
                              server_fault=False, rand=0.5)
        assert out.state == "dead"
        assert out.attempts == 3
        assert "attempts exhausted (3/3)" in out.reason

    def test_server_fault_refunds_the_attempt_and_uses_its_own_budget(self):
        out = failure_outcome(attempts=3, max_attempts=3, server_faults=4, max_server_faults=20,
                              server_fault=True, rand=0.99)
        assert out.state == "queued"
        assert out.attempts == 2
        assert out.server_faults == 5
        assert out.delay_seconds <= DEFAULT_POLICY.server_fault_cap_seconds

    def test_server_fault_delay_is_short_compared_to_job_backoff(self):
        policy = RetryPolicy()
        fault = failure_outcome(attempts=1, max_attempts=9, server_faults=0, max_server_faults=20,
                                server_fault=True, rand=0.9, policy=policy)
        assert fault.delay_seconds == pytest.approx(0.9 * policy.server_fault_base_seconds)

    def test_server_faults_exhausted_is_dead(self):
        out = failure_outcome(attempts=1, max_attempts=3, server_faults=19, max_server_faults=20,
                              server_fault=True, rand=0.5)
        assert out.state == "dead"
        assert out.server_faults == 20
        assert out.attempts == 0
        assert "server faults exhausted (20/20)" in out.reason

    def test_refund_never_goes_negative(self):
        out = failure_outcome(attempts=0, max_attempts=3, server_faults=0, max_server_faults=20,
                              server_fault=True, rand=0.5)
        assert out.attempts == 0


class TestPolicy:
    @pytest.mark.parametrize("field", ["base_seconds", "cap_seconds", "server_fault_base_seconds",
                                       "server_fault_cap_seconds"])
    @pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "3"])
    def test_each_field_must_be_positive_finite(self, field, value):
        with pytest.raises(ValueError, match=field):
            RetryPolicy(**{field: value})

    def test_cap_below_base_is_rejected(self):
        with pytest.raises(ValueError, match="cap_seconds"):
            RetryPolicy(base_seconds=10, cap_seconds=5)


class TestRank:
    """The claim order lives in SQL only (`jobs_enqueue` stores rank = created + priority × aging); these
    pin its properties on the rank Postgres computes."""

    @staticmethod
    def ranks(conn, batch, aging=30.0):
        from aibot.queue import jobs

        ids = jobs.enqueue_many(conn, [jobs.NewJob("chat", mid, "e", "m", p) for mid, p in batch], aging_seconds=aging)
        rows = {r["id"]: r["rank"] for r in conn.execute("SELECT id, rank FROM aibot.jobs WHERE id = ANY(%s)", (ids,))}
        return [rows[i] for i in ids]

    def test_fifo_within_a_priority(self, conn):
        [first] = self.ranks(conn, [("a", 5)])
        [second] = self.ranks(conn, [("b", 5)])
        assert first < second

    def test_higher_priority_first_among_same_age(self, conn):
        p0, p1 = self.ranks(conn, [("a", 0), ("b", 1)])
        assert p0 < p1

    def test_old_low_priority_overtakes_after_difference_times_aging(self, conn):
        wait = overtake_after_seconds(10, 0, 30)
        assert wait == 300
        low, high = self.ranks(conn, [("a", 10), ("b", 0)])
        assert low - high == pytest.approx(wait)   # a p0 job enqueued `wait` later ranks level with it

    def test_strict_priority_with_huge_aging(self, conn):
        ten_years = 10 * 365 * 86400
        p1, p0 = self.ranks(conn, [("a", 1), ("b", 0)], aging=STRICT_PRIORITY_AGING)
        assert p1 - p0 > ten_years

    @pytest.mark.parametrize("aging", [0, 0.0, -5, float("nan"), float("inf"), True, "30"])
    def test_aging_must_be_positive(self, aging):
        with pytest.raises(ValueError, match="aging_seconds"):
            validate_aging(aging)

    @pytest.mark.parametrize("priority", [-1, 100])
    def test_priority_range(self, priority):
        from aibot.queue import jobs

        with pytest.raises(ValueError, match="priority"):
            jobs.NewJob("chat", "a", "e", "m", priority)
