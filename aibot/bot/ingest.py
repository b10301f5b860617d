"""Turns a batch of raw chat messages into job rows, atomically with the source's read cursor.

One transaction per batch holds the job inserts, the cursor move and the doorbell wake-ups: a crash
anywhere before the commit leaves neither jobs nor a moved cursor (the batch is simply read again),
and no job is ever committed without the wake-up that gets it claimed. Jobs are unique on
(source, message id, entity), so re-reading a message is a no-op and a rejected message is recorded
once, however often it is seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aibot import db
from aibot.bot import cursor as cursors
from aibot.bot import rules
from aibot.bot.sources import Incoming
from aibot.config.modelid import naming_kind
from aibot.queue import doorbell

log = logging.getLogger("aibot.bot.ingest")

NEW, DUPLICATE, REJECTED, IGNORED = "new", "duplicate", "rejected", "ignored"
RAW_PREVIEW_CHARS = 2000


@dataclass(frozen=True)
class Outcome:
    status: str                      # new | duplicate | rejected | ignored
    message_id: str
    entity_id: str
    label: str | None = None
    reason: str | None = None
    job_id: int | None = None
    priority: int | None = None


@dataclass
class IngestResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def new(self) -> int:
        return self.count(NEW)

    @property
    def duplicate(self) -> int:
        return self.count(DUPLICATE)

    @property
    def rejected(self) -> int:
        return self.count(REJECTED)

    @property
    def ignored(self) -> int:
        return self.count(IGNORED)

    @property
    def job_ids(self) -> list[int]:
        return [o.job_id for o in self.outcomes if o.job_id is not None]

    def summary(self) -> str:
        return f"{self.new} new, {self.duplicate} duplicate, {self.rejected} rejected, {self.ignored} ignored"


def decide(item: Incoming, config: Any, *, backend_kind: str = "lmstudio") -> rules.Decision:
    if item.error is not None:
        return rules.Decision(rules.REJECT, item.fallback_id or rules.synthetic_id(item.raw), reason=item.error)
    return rules.evaluate(item.raw, config, backend_kind=backend_kind, fallback_id=item.fallback_id)


def _max_attempts(config: Any, entity_id: str) -> int:
    """The entity's `maxAttempts`, else `queueSettings.maxRetries` (the original's name for it), else 3."""
    entity = config.entity(entity_id) if entity_id != "-" else None
    for value in (getattr(entity, "max_attempts", None),
                  getattr(getattr(config, "queue_settings", None), "max_retries", None)):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return 3


def ingest(conn, source_name: str, messages: Iterable[Incoming | Any], config: Any, *, settings: Any = None,
           cursor: str | None = None, backend_kind: str | None = None) -> IngestResult:
    """Records every message's decision and moves `source_name`'s cursor to `cursor`, in one transaction.

    Works on an autocommit connection (opens a transaction) or inside the caller's (a savepoint, so the
    caller's commit decides).
    """
    from aibot.queue.jobs import send_enqueue
    from aibot.queue.policy import DEFAULT_AGING_SECONDS

    # The settings validated it (> 0, `aibot.queue.policy.validate_aging`); enqueue checks it again.
    aging = getattr(settings, "aging_seconds", DEFAULT_AGING_SECONDS)
    outcomes, jobs, job_slots = _plan(source_name, messages, config, backend_kind or naming_kind(config))
    runnable = sum(job.state == "queued" for job in jobs)

    # One round trip: the inserts, the cursor move and the wake-ups are pipelined with BEGIN and COMMIT
    # (their results read after), so a message waits for one exchange with Postgres, not five. The
    # doorbell counts the batch's runnable jobs before the insert tells which were duplicates: a ring
    # is bounded by what is claimable now, so one for a re-read message wakes no worker in vain.
    with db.one_round_trip(conn):
        ids_of = send_enqueue(conn, jobs, aging_seconds=aging)
        if cursor is not None:
            cursors.save(conn, source_name, cursor)
        doorbell.send_ring(conn, runnable)
    ids = ids_of()
    for slot, job_id in zip(job_slots, ids, strict=True):
        o = outcomes[slot]
        assert o is not None
        status = DUPLICATE if job_id is None else o.status
        outcomes[slot] = Outcome(status, o.message_id, o.entity_id, o.label, o.reason, job_id, o.priority)

    result = IngestResult([o for o in outcomes if o is not None])
    for o in result.outcomes:
        if o.status == REJECTED:
            log.warning("rejected %s message %s (entity %s): %s", source_name, o.message_id, o.entity_id, o.reason)
        elif o.status == NEW and o.reason:
            log.warning("queued %s message %s (entity %s) with warnings: %s", source_name, o.message_id,
                        o.entity_id, o.reason)
    if result.outcomes:
        log.info("ingested %d %s message(s): %s", len(result.outcomes), source_name, result.summary())
    return result


def judge(messages: Iterable[Incoming | Any], config: Any, *, backend_kind: str | None = None) -> IngestResult:
    """What `ingest` would record for these messages, writing nothing (`aibot enqueue --check`): the
    same decisions, except that duplicates of jobs already in the database cannot be seen."""
    outcomes, _, _ = _plan("check", messages, config, backend_kind or naming_kind(config))
    return IngestResult([o for o in outcomes if o is not None])


def _plan(source_name: str, messages: Iterable[Incoming | Any], config: Any,
          kind: str) -> tuple[list[Outcome | None], list[Any], list[int]]:
    """Every message's outcome, the job rows to insert, and for each job row the index of its outcome
    (which `ingest` turns into a duplicate when the insert finds the job already there). An ignored
    message creates no job, so its outcome has no priority."""
    from aibot.queue.jobs import NewJob

    outcomes: list[Outcome | None] = []
    jobs: list[Any] = []
    job_slots: list[int] = []
    keys: dict[tuple[str, str], int] = {}
    for item in messages:
        if not isinstance(item, Incoming):
            item = Incoming(raw=item)
        d = decide(item, config, backend_kind=kind)
        if d.action == rules.IGNORE:
            outcomes.append(Outcome(IGNORED, d.message_id, d.entity_id, item.label, d.reason))
            continue
        key = (d.message_id, d.entity_id)
        if key in keys:  # the same message twice in one batch: the second is a duplicate
            outcomes.append(Outcome(DUPLICATE, d.message_id, d.entity_id, item.label, d.reason,
                                    priority=d.priority))
            continue
        keys[key] = len(outcomes)
        job_slots.append(len(outcomes))
        max_attempts = _max_attempts(config, d.entity_id)
        if d.action == rules.JOB:
            jobs.append(NewJob(source=source_name, source_message_id=d.message_id, entity_id=d.entity_id,
                               model=d.model, priority=d.priority, payload=d.payload, message_at=d.message_at,
                               max_attempts=max_attempts))
        else:
            jobs.append(NewJob(source=source_name, source_message_id=d.message_id, entity_id=d.entity_id,
                               model=None, priority=d.priority, state="rejected", reason=d.reason,
                               payload={"raw": rules.preview(item.raw, RAW_PREVIEW_CHARS), "label": item.label},
                               message_at=None, max_attempts=max_attempts))
        outcomes.append(Outcome(REJECTED if d.action == rules.REJECT else NEW, d.message_id, d.entity_id,
                                item.label, d.reason if d.action == rules.REJECT else _warnings(d),
                                priority=d.priority))
    return outcomes, jobs, job_slots


def _warnings(d: rules.Decision) -> str | None:
    return "; ".join(d.warnings) or None
