"""The chaos schedule and the end-of-run verdict, as pure functions.

Both are kept free of I/O so a run can be replayed from its seed (the same seed gives the same events
at the same offsets against the same targets) and so the invariants themselves are unit-tested: a
checker that cannot fail proves nothing.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KILL_WORKER = "kill_worker"          # kill -9 one worker process of a master (mid-generation)
KILL_MASTER = "kill_master"          # kill -9 a whole dramatiq master (its process group)
TERM_MASTER = "term_master"          # SIGTERM a master with generations in flight (graceful)
TERMINATE_BACKENDS = "terminate_backends"  # pg_terminate_backend() every session of the test database
RESTART_POSTGRES = "restart_postgres"      # pg_ctlcluster ... restart (local cluster only)
SERVER_OUTAGE = "server_outage"            # one simulated LLM server refuses connections for a while
EVENT_KINDS = (KILL_WORKER, KILL_MASTER, TERM_MASTER, TERMINATE_BACKENDS, RESTART_POSTGRES, SERVER_OUTAGE)

MASTERS = ("a", "b")
TERMINAL_STATES = ("done", "skipped", "dead", "rejected", "cancelled")
ENDED_WITH_REASON = ("skipped", "dead", "rejected", "cancelled")


@dataclass(frozen=True)
class Event:
    at: float            # seconds after traffic starts
    kind: str
    target: str = ""     # master name for process events, server name for outages
    seconds: float = 0.0  # outage length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(seed: int, *, duration: float, servers: Sequence[str], outage_seconds: float,
                  worker_kills: int = 3, master_kills: int = 1, terms: int = 1, backend_kills: int = 1,
                  pg_restarts: int = 1) -> list[Event]:
    """Every requested event once, spread over the middle 80 % of `duration` in a seeded order.

    Events are spaced evenly with seeded jitter (never two at the same instant, so each one's effect
    can be attributed) and targets alternate between the masters so both get hurt. The outage is
    placed early enough to end before traffic stops.
    """
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration!r}")
    if not servers:
        raise ValueError("servers: need at least one simulated server to take down")
    rng = random.Random(seed)
    kinds = ([KILL_WORKER] * worker_kills + [KILL_MASTER] * master_kills + [TERM_MASTER] * terms
             + [TERMINATE_BACKENDS] * backend_kills + [RESTART_POSTGRES] * pg_restarts)
    rng.shuffle(kinds)
    # The outage goes into the first half: it must be over (and its backlog served) before the end.
    outage_slot = rng.randrange(0, max(1, len(kinds) // 2 + 1))
    kinds.insert(outage_slot, SERVER_OUTAGE)
    start, span = duration * 0.1, duration * 0.8
    step = span / len(kinds)
    events = []
    master_turn = rng.randrange(len(MASTERS))
    for i, kind in enumerate(kinds):
        at = round(start + step * i + rng.uniform(0, step * 0.5), 2)
        target, seconds = "", 0.0
        if kind in (KILL_WORKER, KILL_MASTER, TERM_MASTER):
            target = MASTERS[master_turn % len(MASTERS)]
            master_turn += 1
        elif kind == SERVER_OUTAGE:
            target = rng.choice(list(servers))
            seconds = outage_seconds
        events.append(Event(at, kind, target, seconds))
    return events


# ------------------------------------------------------------------------------------------ verdict


@dataclass
class Observed:
    """What a run left behind, gathered after it went quiet."""

    messages: list[dict]                  # {"id", "expect": "answer" | "reject"} as posted to the chat
    replies_by_reply_to: Mapping[str, int]
    jobs: list[dict]                      # {"source_message_id", "state", "reason", "last_error", "reply"}
    max_lease_overdue: float              # worst (now - lease_expires_at) of a running job seen by the monitor
    lease_margin: float
    peaks: list[tuple[str, str, int, int]]  # (server, model, peak in flight at the simulator, parallel there)
    loaded_instances: list[tuple[str, str, int]]  # (server, model, most instances seen at once, sampled)
    loads: list[dict]                     # aibot.model_loads rows: server_id, model, started_at, finished_at
    left_running_after_term: list[dict] = field(default_factory=list)  # jobs a SIGTERMed master left running
    post_log: list[dict] = field(default_factory=list)   # every post the chat received: id, text, timestamp, outcome
    tracebacks: Mapping[str, int] = field(default_factory=dict)   # process log -> unhandled tracebacks in it


TRACEBACK = "Traceback (most recent call last)"


def count_tracebacks(logs: Mapping[str, str]) -> dict[str, int]:
    """Tracebacks per process log (only the logs that have any)."""
    return {name: n for name, text in logs.items() if (n := text.count(TRACEBACK))}


def sink_repeats(post_log: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What a sink that does NOT deduplicate by id would have shown, from every post received.

    Such a sink keeps every post it answers with success or as a duplicate, so `duplicates` counts the
    repeats it would store. A re-sent reply is identical (same id, text and timestamp: the stored
    reply); a different body under one id is a `regeneration`, the promise this counts against.
    """
    posts = list(post_log)
    kept = Counter(str(p["id"]) for p in posts if p["outcome"] in ("stored", "duplicate"))
    bodies: dict[str, set] = {}
    for p in posts:
        bodies.setdefault(str(p["id"]), set()).add((p["text"], p.get("timestamp")))
    regenerated = sorted(i for i, b in bodies.items() if len(b) > 1)
    return {"posts": len(posts), "kept": sum(kept.values()),
            "duplicates": sum(n - 1 for n in kept.values() if n > 1),
            "regenerations": len(regenerated), "regenerated_ids": regenerated[:20]}


#: Violations of the single-flight loading promise start with this.
LOAD = "load: "


def overlapping_loads(loads: Iterable[Mapping[str, Any]]) -> list[tuple[dict, dict]]:
    """Pairs of finished load attempts of one model on one server whose [started, finished] overlap.

    A load that never finished (its loader was killed, or lost its database session) has no end to
    compare; whether the server ended up with a duplicate is what the simulator's instance count says.
    """
    by_key: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in loads:
        by_key.setdefault((row["server_id"], row["model"]), []).append(row)
    pairs = []
    for rows in by_key.values():
        rows = sorted(rows, key=lambda r: r["started_at"])
        for prev, cur in zip(rows, rows[1:]):
            if prev["finished_at"] is not None and cur["started_at"] < prev["finished_at"]:
                pairs.append((dict(prev), dict(cur)))
    return pairs


def verdict(obs: Observed) -> tuple[dict[str, int], list[str]]:
    """Counts of outcomes and the list of broken promises (empty = the run kept every promise)."""
    violations: list[str] = []
    jobs_by_msg: dict[str, list[dict]] = {}
    for job in obs.jobs:
        jobs_by_msg.setdefault(str(job["source_message_id"]), []).append(job)
    posted = {str(m["id"]): m for m in obs.messages}
    counts: Counter[str] = Counter()

    for mid, n in obs.replies_by_reply_to.items():
        if mid not in posted:
            violations.append(f"reply to {mid!r}, which nobody asked for ({n}x)")
    for mid, msg in posted.items():
        replies = int(obs.replies_by_reply_to.get(mid, 0))
        rows = jobs_by_msg.get(mid, [])
        if replies > 1:
            violations.append(f"message {mid}: answered {replies} times")
        if len(rows) != 1:
            violations.append(f"message {mid}: {len(rows)} job rows (expected exactly 1)")
            continue
        job = rows[0]
        state = job["state"]
        counts[state] += 1
        if state not in TERMINAL_STATES:
            violations.append(f"message {mid}: job still {state} after the run went quiet")
            continue
        if state == "done" and replies != 1:
            violations.append(f"message {mid}: job done but {replies} replies at the chat (reply lost)")
        if state != "done" and replies:
            violations.append(f"message {mid}: job {state} but a reply was posted")
        if state in ENDED_WITH_REASON and not (job.get("reason") or "").strip():
            violations.append(f"message {mid}: job {state} without a reason")
        if msg.get("expect") == "reject" and state != "rejected":
            violations.append(f"message {mid}: bad input ended {state}, expected rejected")
        if state == "done":
            counts["answered_once"] += 1
    if obs.max_lease_overdue > obs.lease_margin:
        violations.append(f"a job stayed running {obs.max_lease_overdue:.1f}s past its lease "
                          f"(margin {obs.lease_margin:.0f}s)")
    for job in obs.left_running_after_term:
        violations.append(f"SIGTERMed master left job {job.get('id')} running ({job.get('worker_id')})")
    duplicated = {(server, model) for server, model, n in obs.loaded_instances if n > 1}
    for server, model, peak, parallel in obs.peaks:
        if peak > parallel:
            # With a duplicate instance the server really has 2 x parallel slots: a symptom of that bug.
            prefix = LOAD if (server, model) in duplicated else ""
            violations.append(f"{prefix}{server}/{model}: {peak} generations at once > parallel {parallel}")
    for server, model in sorted(duplicated):
        n = max(n for s, m, n in obs.loaded_instances if (s, m) == (server, model))
        violations.append(f"{LOAD}{server}/{model}: {n} instances at once (a duplicate load)")
    for a, b in overlapping_loads(obs.loads):
        violations.append(f"{LOAD}server {a['server_id']}/{a['model']}: loads overlap "
                          f"({a['started_at']}..{a['finished_at']} and {b['started_at']}..{b['finished_at']})")
    repeats = sink_repeats(obs.post_log)
    if repeats["regenerations"]:
        violations.append(f"{repeats['regenerations']} reply id(s) posted with different bodies (regenerated): "
                          f"{', '.join(repeats['regenerated_ids'])}")
    for name, n in sorted(obs.tracebacks.items()):
        violations.append(f"{n} unhandled traceback(s) in the log of {name}")
    counts["messages"] = len(posted)
    counts["replies"] = sum(int(n) for n in obs.replies_by_reply_to.values())
    return dict(counts), violations
