"""Retry, backoff, priority and aging rules for the job queue, as pure functions.

The queue's SQL applies these decisions but does not make them, so they can be unit-tested without a
database and tuned in one place. Randomness is an argument (`rand` in [0, 1)), never drawn here, so a
test can pin the jitter. The claim order itself (rank = created + priority × aging) is computed once,
in SQL, when a job is enqueued (`jobs_enqueue`); this module only validates the aging step it uses.

Owns no state and does no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIORITY_MIN = 0
PRIORITY_MAX = 99
#: An aging step this large makes priorities strict for any realistic backlog age (~31 years per step).
STRICT_PRIORITY_AGING = 1e9
#: Seconds of waiting worth one priority step, unless the settings say otherwise (AIBOT_AGING_SECONDS).
DEFAULT_AGING_SECONDS = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """How long a failed job waits before it is runnable again.

    A job failure (bad answer, timeout, malformed request) backs off exponentially from `base_seconds`
    to `cap_seconds`, by the attempt count. A server fault is not the job's fault: it gets a short
    delay (by its server-fault count) so the job moves to another server holding the model soon,
    while the server itself is backed off cluster-wide by `aibot.cluster.health`.
    """

    base_seconds: float = 2.0
    cap_seconds: float = 300.0
    server_fault_base_seconds: float = 0.5
    server_fault_cap_seconds: float = 15.0

    def __post_init__(self) -> None:
        for name in ("base_seconds", "cap_seconds", "server_fault_base_seconds", "server_fault_cap_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"RetryPolicy.{name} must be a finite number > 0, got {value!r}")
        if self.cap_seconds < self.base_seconds:
            raise ValueError(
                f"RetryPolicy.cap_seconds ({self.cap_seconds!r}) must be >= base_seconds ({self.base_seconds!r})")
        if self.server_fault_cap_seconds < self.server_fault_base_seconds:
            raise ValueError(
                f"RetryPolicy.server_fault_cap_seconds ({self.server_fault_cap_seconds!r}) must be >= "
                f"server_fault_base_seconds ({self.server_fault_base_seconds!r})")


DEFAULT_POLICY = RetryPolicy()


def backoff_delay(failures: int, rand: float, *, base: float, cap: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(failures-1))).

    Full jitter (rather than a fixed exponential) spreads the retries of jobs that failed together,
    e.g. all jobs of a server that just went away, so they do not come back as one burst.
    `failures` counts this failure too (1 for the first).
    """
    if not isinstance(failures, int) or failures < 1:
        raise ValueError(f"failures must be an int >= 1, got {failures!r}")
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand!r}")
    # 2**1100 overflows a float; the cap is reached long before that anyway.
    ceiling = cap if failures > 64 else min(cap, base * 2.0 ** (failures - 1))
    return ceiling * rand


@dataclass(frozen=True)
class FailureOutcome:
    state: str            # 'queued' (retry later) or 'dead'
    delay_seconds: float  # until runnable again; 0 when dead
    attempts: int         # new value of jobs.attempts
    server_faults: int    # new value of jobs.server_faults
    reason: str | None    # why dead, else None


def failure_outcome(*, attempts: int, max_attempts: int, server_faults: int, max_server_faults: int,
                    server_fault: bool, rand: float, policy: RetryPolicy = DEFAULT_POLICY) -> FailureOutcome:
    """Decides what a failure of a running job does to it.

    `attempts` already includes the current claim. A job failure uses up that attempt and the job is
    dead once `attempts >= max_attempts`. A server fault refunds the attempt (the job did nothing wrong)
    and counts against the separate, larger `max_server_faults` budget instead, so a flapping server
    cannot kill good jobs quickly but a job no server can ever serve still ends.
    """
    if server_fault:
        faults = server_faults + 1
        refunded = max(attempts - 1, 0)
        if faults >= max_server_faults:
            return FailureOutcome("dead", 0.0, refunded, faults,
                                  f"server faults exhausted ({faults}/{max_server_faults})")
        delay = backoff_delay(faults, rand, base=policy.server_fault_base_seconds,
                              cap=policy.server_fault_cap_seconds)
        return FailureOutcome("queued", delay, refunded, faults, None)
    if attempts >= max_attempts:
        return FailureOutcome("dead", 0.0, attempts, server_faults,
                              f"attempts exhausted ({attempts}/{max_attempts})")
    delay = backoff_delay(max(attempts, 1), rand, base=policy.base_seconds, cap=policy.cap_seconds)
    return FailureOutcome("queued", delay, attempts, server_faults, None)


def validate_aging(aging_seconds: float) -> float:
    """The one rule for the aging step: a finite number of seconds > 0.

    0 would not mean "no aging" but "priority counts for nothing" (pure FIFO), by accident; strict
    priority is a very large step (STRICT_PRIORITY_AGING). Settings, ingest and enqueue all apply this.
    """
    if isinstance(aging_seconds, bool) or not isinstance(aging_seconds, (int, float)) \
            or not math.isfinite(aging_seconds) or aging_seconds <= 0:
        raise ValueError(
            f"aging_seconds must be a finite number > 0 (use {STRICT_PRIORITY_AGING:g} for strict priority), "
            f"got {aging_seconds!r}")
    return float(aging_seconds)


def overtake_after_seconds(low_priority: int, high_priority: int, aging_seconds: float) -> float:
    """How much older a job of `low_priority` (larger number) must be to run before a `high_priority` one."""
    return (low_priority - high_priority) * validate_aging(aging_seconds)
