"""The durable job queue in Postgres (the `aibot.jobs` table).

Why it looks like this: workers on several hosts claim with `FOR UPDATE SKIP LOCKED` so they never wait
on each other; each claim carries a fresh token that every later call must present, so a worker whose
lease expired and whose job was taken over cannot complete, renew or store a reply (fencing). Retry
decisions are pure functions in `aibot.queue.policy`; the SQL is in `sql/queries/jobs.sql` and the claim
function in `sql/migrations/0002_queue.sql`. See docs/queue.md.

Every call runs in its own transaction, or in a savepoint when the caller already has one open (so
`bot.ingest` can insert jobs and ring doorbells atomically). The single-statement calls (claim,
renew, store, complete, release, reject) open no transaction of their own on an idle autocommit
connection (`db.single_statement`): the statement is its own transaction, one round trip instead of
three, which is how the worker's happy path runs them (`Database.autocommit`).

Owns the `jobs` rows and their states; the retry decisions are `aibot.queue.policy`'s and the
claim order is SQL's (`jobs_enqueue`). Knows nothing of LLM servers beyond the slot a claim takes.
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from aibot import db
from aibot.queue.policy import (
    DEFAULT_AGING_SECONDS,
    DEFAULT_POLICY,
    PRIORITY_MAX,
    PRIORITY_MIN,
    RetryPolicy,
    failure_outcome,
    validate_aging,
)

log = logging.getLogger(__name__)
queries = db.Queries(__name__)

INSERTABLE_STATES = ("queued", "rejected")
COMPLETE_STATES = ("done", "skipped")
#: Upper bound on candidates one claim call locks and inspects (see claim_jobs in 0002_queue.sql).
DEFAULT_MAX_SCAN = 100
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class NewJob:
    """A job to enqueue. Rows with state 'rejected' (and a reason) record bad input instead of dropping it."""

    source: str
    source_message_id: str
    entity_id: str
    model: str | None
    priority: int
    payload: Mapping[str, Any] = field(default_factory=dict)
    message_at: datetime | None = None
    max_attempts: int = 3
    state: str = "queued"
    reason: str | None = None
    available_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("source", "source_message_id", "entity_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"NewJob.{name} must be a non-empty string, got {value!r}")
        if self.state not in INSERTABLE_STATES:
            raise ValueError(f"NewJob.state must be one of {INSERTABLE_STATES}, got {self.state!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) \
                or not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise ValueError(f"NewJob.priority must be an int {PRIORITY_MIN}..{PRIORITY_MAX}, got {self.priority!r}")
        if self.state == "queued" and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"NewJob.model must be a non-empty string for a queued job, got {self.model!r}")
        if self.state == "rejected" and not self.reason:
            raise ValueError("NewJob.reason is required when state is 'rejected'")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"NewJob.max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not isinstance(self.payload, Mapping):
            raise ValueError(f"NewJob.payload must be a mapping, got {type(self.payload).__name__}")
        for name in ("message_at", "available_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"NewJob.{name} must be a timezone-aware datetime, got {value!r}")

    def _row(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_message_id": self.source_message_id,
            "entity_id": self.entity_id,
            "model": self.model,
            "priority": self.priority,
            "payload": dict(self.payload),
            "message_at": self.message_at.isoformat() if self.message_at else None,
            "max_attempts": self.max_attempts,
            "state": self.state,
            "reason": self.reason,
            "available_at": self.available_at.isoformat() if self.available_at else None,
        }


@dataclass(frozen=True)
class Claim:
    """A claimed job: `token` must accompany every later call about it."""

    job_id: int
    token: uuid.UUID
    attempts: int
    entity_id: str
    model: str | None
    priority: int
    payload: dict
    reply: dict | None
    server_id: int | None
    slot_id: int | None
    lease_expires_at: datetime
    source: str = ""
    source_message_id: str = ""
    message_at: datetime | None = None
    max_attempts: int = 3
    server_faults: int = 0
    created_at: datetime | None = None
    instance: str | None = None          # the server's name for the serving instance (send it as `model`)
    context_length: int | None = None    # tokens one request may use on that instance

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> Claim:
        return cls(
            job_id=row["job_id"], token=row["claim_token"], attempts=row["attempts"],
            entity_id=row["entity_id"], model=row["model"], priority=row["priority"],
            payload=row["payload"], reply=row["reply"], server_id=row["server_id"], slot_id=row["slot_id"],
            lease_expires_at=row["lease_expires_at"], source=row["source"],
            source_message_id=row["source_message_id"], message_at=row["message_at"],
            max_attempts=row["max_attempts"], server_faults=row["server_faults"], created_at=row["created_at"],
            instance=row.get("instance_id"), context_length=row.get("context_length"),
        )


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def enqueue_many(conn: psycopg.Connection, jobs: Iterable[NewJob], *,
                 aging_seconds: float = DEFAULT_AGING_SECONDS) -> list[int | None]:
    """Inserts jobs in one round trip; returns, in input order, the new id or None for a duplicate.

    Duplicates are (source, source_message_id, entity_id) already present, or repeated earlier in the
    same batch: re-reading a source after a crash enqueues nothing twice.
    """
    with db.single_statement(conn):
        ids = send_enqueue(conn, jobs, aging_seconds=aging_seconds)
    return ids()


def send_enqueue(conn: psycopg.Connection, jobs: Iterable[NewJob], *,
                 aging_seconds: float = DEFAULT_AGING_SECONDS) -> Callable[[], list[int | None]]:
    """`enqueue_many` in the caller's transaction, its result read later: the returned function gives
    the ids. In pipeline mode the insert leaves with the caller's other statements (the bot's ingest:
    jobs, cursor and doorbell in one round trip); reading the ids before the pipeline syncs syncs it."""
    aging = validate_aging(aging_seconds)
    batch = list(jobs)
    for i, job in enumerate(batch):
        if not isinstance(job, NewJob):
            raise TypeError(f"jobs[{i}] must be a NewJob, got {type(job).__name__}")
    if not batch:
        return list
    cur = queries.run(conn, "jobs_enqueue", {"jobs": Jsonb([j._row() for j in batch]), "aging_seconds": aging})
    return lambda: [r["id"] for r in cur.fetchall()]


def claim_batch(conn: psycopg.Connection, worker_id: str, limit: int, *, lease_seconds: float,
                use_slots: bool = False, max_scan: int | None = None) -> list[Claim]:
    """Claims up to `limit` jobs in priority order in one short transaction (see `claim`)."""
    params = _claim_params(worker_id, limit, lease_seconds=lease_seconds, use_slots=use_slots, max_scan=max_scan)
    with db.single_statement(conn):
        rows = queries.all(conn, "jobs_claim", params)
    return _claims(rows)


def _claim_params(worker_id: str, limit: int, *, lease_seconds: float, use_slots: bool,
                  max_scan: int | None) -> dict[str, Any]:
    if not isinstance(worker_id, str) or not worker_id:
        raise ValueError(f"worker_id must be a non-empty string, got {worker_id!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    lease = _positive("lease_seconds", lease_seconds)
    scan = max(DEFAULT_MAX_SCAN, limit) if max_scan is None else max_scan
    if isinstance(scan, bool) or not isinstance(scan, int) or scan < limit:
        raise ValueError(f"max_scan must be an int >= limit ({limit}), got {scan!r}")
    return {"worker_id": worker_id, "lease_seconds": lease, "use_slots": bool(use_slots), "limit": limit,
            "max_scan": scan}


def _claims(rows: list[dict]) -> list[Claim]:
    claims = [Claim._from_row(r) for r in rows]
    if log.isEnabledFor(logging.DEBUG):
        for c in claims:
            log.debug("claimed job %s (attempt %s, server %s, slot %s)", c.job_id, c.attempts, c.server_id, c.slot_id)
    return claims


def claim(conn: psycopg.Connection, worker_id: str, *, lease_seconds: float, use_slots: bool = True,
          max_scan: int | None = None) -> Claim | None:
    """Takes the best runnable job, or None.

    With `use_slots` the job also takes a free slot on an enabled, non-draining, not-down, not
    backed-off server holding its model (the server with most free slots for it); jobs whose model
    has no free slot are passed over, not waited for. A job with a stored reply needs no slot.
    """
    got = claim_batch(conn, worker_id, 1, lease_seconds=lease_seconds, use_slots=use_slots, max_scan=max_scan)
    return got[0] if got else None


def note_waiting(conn: psycopg.Connection, model: str, reason: str) -> int:
    """Records on every queued job of `model` why it is still waiting (e.g. no server can load the
    model, and why), so `aibot status`, `jobs list` and the dashboard show it; returns rows changed.
    The note is the job's `waiting_reason`, not its `last_error`: an earlier attempt's error stays."""
    with conn.transaction():
        return queries.run(conn, "jobs_note_waiting", {"model": model, "reason": reason[:MAX_ERROR_CHARS]}).rowcount


def clear_waiting(conn: psycopg.Connection, model: str) -> int:
    """The model was loaded: forget the waiting notes `note_waiting` left on its queued jobs."""
    with conn.transaction():
        return queries.run(conn, "jobs_clear_waiting", {"model": model}).rowcount


def _token_call(conn: psycopg.Connection, name: str, params: dict[str, Any]) -> dict | None:
    with db.single_statement(conn):
        return queries.one(conn, name, params)


def renew(conn: psycopg.Connection, job_id: int, token: uuid.UUID, lease_seconds: float) -> bool:
    """Heartbeat: extends the lease; False means the job is no longer ours (stop working on it)."""
    lease = _positive("lease_seconds", lease_seconds)
    return _token_call(conn, "jobs_renew", {"job_id": job_id, "token": token, "lease_seconds": lease}) is not None


def store_reply(conn: psycopg.Connection, job_id: int, token: uuid.UUID, reply: Mapping[str, Any], *,
                started_at: datetime | None = None, generated_at: datetime | None = None) -> bool:
    """Makes a generated reply durable on the job before it is posted: every later attempt (a failed
    post, a lost completion, a worker killed after the post, a re-claim after the lease) re-sends this
    reply instead of generating another. False: the claim is no longer ours, so do not post."""
    if not isinstance(reply, Mapping):
        raise ValueError(f"reply must be a mapping, got {type(reply).__name__}")
    return _token_call(conn, "jobs_store_reply", {"job_id": job_id, "token": token, "reply": Jsonb(dict(reply)),
                                                  "started_at": started_at, "generated_at": generated_at}) is not None


def _check_complete_state(state: str) -> None:
    if state not in COMPLETE_STATES:
        raise ValueError(f"state must be one of {COMPLETE_STATES}, got {state!r}")


def complete(conn: psycopg.Connection, job_id: int, token: uuid.UUID, *, state: str = "done",
             reason: str | None = None) -> bool:
    _check_complete_state(state)
    return _token_call(conn, "jobs_complete",
                       {"job_id": job_id, "token": token, "state": state, "reason": reason}) is not None


def finish_delivered(conn: psycopg.Connection, job_id: int, token: uuid.UUID, reply: Mapping[str, Any] | None, *,
                     started_at: datetime | None, generated_at: datetime | None) -> bool:
    """Done: the sink accepted the reply. `reply`/timings None keep what `store_reply` stored (the
    worker's path: the reply is not rewritten, so the completing UPDATE stays small)."""
    return _token_call(conn, "jobs_finish_delivered",
                       _finish_params(job_id, token, reply, started_at, generated_at)) is not None


def finish_delivered_into_replies(conn: psycopg.Connection, job_id: int, token: uuid.UUID,
                                  reply: Mapping[str, Any] | None, *, started_at: datetime | None,
                                  generated_at: datetime | None, row: Mapping[str, Any]) -> bool:
    """Done and delivered in one fenced statement, for the Postgres sink in the job's own database:
    the `replies` row (`row`: reply_id, reply_to, entity_id, message, as `PostgresSink.row` builds
    it) is inserted only if this claim still holds the job, and commits with the completion, so no
    reply exists without its job done and none is lost with a session. A reply id already present
    (an earlier attempt's) is left as it is. False: the claim is no longer ours, nothing written."""
    return _token_call(conn, "jobs_finish_delivered_into_replies",
                       _finish_into_replies_params(job_id, token, reply, started_at, generated_at, row)) is not None


def _finish_params(job_id: int, token: uuid.UUID, reply: Mapping[str, Any] | None, started_at: datetime | None,
                   generated_at: datetime | None) -> dict[str, Any]:
    return {"job_id": job_id, "token": token, "reply": None if reply is None else Jsonb(dict(reply)),
            "started_at": started_at, "generated_at": generated_at}


def _finish_into_replies_params(job_id: int, token: uuid.UUID, reply: Mapping[str, Any] | None,
                                started_at: datetime | None, generated_at: datetime | None,
                                row: Mapping[str, Any]) -> dict[str, Any]:
    missing = {"reply_id", "reply_to", "entity_id", "message"} - set(row)
    if missing:
        raise ValueError(f"row is missing {', '.join(sorted(missing))}")
    return {**_finish_params(job_id, token, reply, started_at, generated_at), "reply_id": row["reply_id"],
            "reply_to": row["reply_to"], "entity_id": row["entity_id"], "message": Jsonb(row["message"])}


@dataclass(frozen=True)
class NextClaim:
    """What `finish_delivered_and_claim` claims after the completion: `claim`'s arguments."""

    worker_id: str
    lease_seconds: float
    use_slots: bool = True
    max_scan: int | None = None


def finish_delivered_and_claim(conn: psycopg.Connection, job_id: int, token: uuid.UUID,
                               reply: Mapping[str, Any] | None, *, started_at: datetime | None,
                               generated_at: datetime | None, row: Mapping[str, Any] | None = None,
                               next_claim: NextClaim) -> tuple[bool, Claim | None]:
    """`finish_delivered` (or, with `row`, `finish_delivered_into_replies`) and then `claim`, sent
    together in one pipeline: one round trip and, on an idle autocommit connection, one transaction
    (statements before a pipeline's sync share its implicit transaction), so a busy worker's slot is
    handed to its next job as the last one completes, with no gap and no round trip of its own.

    Both commit or neither: a claim that fails undoes the completion too, and the caller's retry
    (plain completion) redoes it. Returns (completed, the next claim or None)."""
    claim_params = _claim_params(next_claim.worker_id, 1, lease_seconds=next_claim.lease_seconds,
                                 use_slots=next_claim.use_slots, max_scan=next_claim.max_scan)
    if row is None:
        name, params = "jobs_finish_delivered", _finish_params(job_id, token, reply, started_at, generated_at)
    else:
        name, params = "jobs_finish_delivered_into_replies", _finish_into_replies_params(
            job_id, token, reply, started_at, generated_at, row)
    with conn.pipeline():
        finished = queries.run(conn, name, params)
        claimed = queries.run(conn, "jobs_claim", claim_params)
    # Leaving the pipeline synced it: both results are in.
    done = finished.fetchone() is not None
    claims = _claims(claimed.fetchall())
    return done, (claims[0] if claims else None)


def finished_by(conn: psycopg.Connection, job_id: int, token: uuid.UUID) -> str | None:
    """The terminal state this claim already put the job in, or None: tells a completion whose
    acknowledgement was lost with its session (it committed) from one that never ran."""
    row = queries.one(conn, "jobs_finished_by", {"job_id": job_id, "token": token})
    return row["state"] if row else None


def complete_many(conn: psycopg.Connection, claims: Sequence[Claim], *, state: str = "done",
                  reason: str | None = None) -> list[int]:
    """Completes a batch of claims in one statement; returns the ids that were still held."""
    _check_complete_state(state)
    if not claims:
        return []
    with conn.transaction():
        rows = queries.all(conn, "jobs_complete_many", {
            "job_ids": [c.job_id for c in claims], "tokens": [c.token for c in claims],
            "state": state, "reason": reason})
    return [r["id"] for r in rows]


def fail(conn: psycopg.Connection, job_id: int, token: uuid.UUID, error: str, *, server_fault: bool = False,
         policy: RetryPolicy = DEFAULT_POLICY, rand: float | None = None) -> str | None:
    """Records a failed attempt; returns the new state ('queued' or 'dead'), or None if not ours.

    `server_fault=True` blames the server (connection refused, 5xx, model unloaded under us): the
    attempt is refunded and the separate server-fault budget is used instead.
    """
    error = str(error)[:MAX_ERROR_CHARS]
    with conn.transaction():
        row = queries.one(conn, "jobs_lock_running", {"job_id": job_id, "token": token})
        if row is None:
            return None
        outcome = failure_outcome(
            attempts=row["attempts"], max_attempts=row["max_attempts"], server_faults=row["server_faults"],
            max_server_faults=row["max_server_faults"], server_fault=server_fault,
            rand=random.random() if rand is None else rand, policy=policy)
        queries.run(conn, "jobs_fail", {
            "job_id": job_id, "token": token, "state": outcome.state, "attempts": outcome.attempts,
            "server_faults": outcome.server_faults, "delay_seconds": outcome.delay_seconds, "error": error,
            "reason": outcome.reason})
    if outcome.state == "dead":
        log.warning("job %s is dead: %s; last error: %s", job_id, outcome.reason, error)
    else:
        log.info("job %s failed (%s), retry in %.1fs", job_id, "server fault" if server_fault else "attempt", outcome.delay_seconds)
    return outcome.state


def release(conn: psycopg.Connection, job_id: int, token: uuid.UUID, *, available_at: datetime | None = None) -> bool:
    """Hands the job back to the queue without using up the attempt (shutdown, rate-limit deferral)."""
    if available_at is not None and (not isinstance(available_at, datetime) or available_at.tzinfo is None):
        raise ValueError(f"available_at must be a timezone-aware datetime, got {available_at!r}")
    return _token_call(conn, "jobs_release", {"job_id": job_id, "token": token, "available_at": available_at}) is not None


def reject(conn: psycopg.Connection, job_id: int, token: uuid.UUID, reason: str) -> bool:
    """Ends a claimed job that can never run, keeping the reason for operators."""
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"reason must be a non-empty string, got {reason!r}")
    return _token_call(conn, "jobs_reject", {"job_id": job_id, "token": token, "reason": reason}) is not None


def cancel(conn: psycopg.Connection, job_id: int, *, force: bool = False, reason: str = "cancelled by operator") -> bool:
    """Cancels a queued job. A running one only with `force`; its worker is then fenced out (its
    in-flight generation is wasted, and a reply already posted stays posted)."""
    return _token_call(conn, "jobs_cancel", {"job_id": job_id, "force": bool(force), "reason": reason}) is not None


def expire_leases_of(conn: psycopg.Connection, worker_ids: Sequence[str]) -> list[int]:
    """Ends the leases of the jobs held by worker processes known to be dead (their supervisor saw
    them exit), so the next reclaim tick re-queues them instead of waiting out the lease. Returns the
    job ids. Same outcome as an expired lease (the attempt counts), only sooner."""
    if not worker_ids:
        return []
    with conn.transaction():
        rows = queries.all(conn, "jobs_expire_leases_of", {"worker_ids": list(worker_ids)})
    return [r["id"] for r in rows]


def reclaim_expired(conn: psycopg.Connection) -> int:
    """Returns running jobs with an expired lease to the queue (or dead when out of attempts)."""
    with conn.transaction():
        rows = queries.all(conn, "jobs_reclaim_expired")
    for r in rows:
        log.warning("job %s lease expired -> %s", r["id"], r["state"])
    return len(rows)


def prune(conn: psycopg.Connection, older_than_seconds: float, *, batch: int = 5000) -> int:
    """Deletes finished jobs older than the retention, in batches so no transaction runs long."""
    older = float(older_than_seconds)
    if not math.isfinite(older) or older < 0:
        raise ValueError(f"older_than_seconds must be a finite number >= 0, got {older_than_seconds!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    total = 0
    while True:
        with conn.transaction():
            n = queries.run(conn, "jobs_prune", {"older_than_seconds": older, "batch": batch}).rowcount
        total += n
        if n < batch:
            return total


def get(conn: psycopg.Connection, job_id: int) -> dict | None:
    return queries.one(conn, "jobs_get", {"job_id": job_id})


def next_available_at(conn: psycopg.Connection) -> datetime | None:
    return queries.one(conn, "jobs_next_available")["available_at"]


def counts(conn: psycopg.Connection) -> dict[str, int]:
    return {r["state"]: r["n"] for r in queries.all(conn, "jobs_counts")}
