"""The demo's final report: pure functions from what the run recorded to the figures it prints.

Inputs are plain records (what was posted, the jobs table, the replies the chat server stored, the
simulators' counters, the slot totals sampled once a second), so every figure can be unit-tested and
recomputed from a `--json` dump.

Definitions (docs/demo.md):
- wait = claimed_at − created_at of the job (time in the queue);
- end-to-end latency = the reply's timestamp at the chat server − the human message's timestamp there;
- makespan = last reply − first human post; replies/min = replies / makespan;
- slot utilisation = busy slot-seconds (Σ claimed→finished of answered jobs) / available slot-seconds
  (∫ total slot rows dt, sampled), over the makespan window;
- speedup = the original's sequential makespan for the same messages (`baseline.py`) / ours.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aibot.cli.render import Column, fmt_bytes, fmt_seconds, table, to_text
from aibot.demo.baseline import SequentialRun

TERMINAL_STATES = frozenset({"done", "skipped", "dead", "rejected", "cancelled"})


@dataclass(frozen=True)
class JobRecord:
    id: int
    message_id: str
    entity: str
    model: str | None
    state: str
    priority: int
    created_at: float             # epoch seconds
    claimed_at: float | None
    finished_at: float | None
    server: str | None
    attempts: int


@dataclass(frozen=True)
class ReplyRecord:
    reply_to: str
    timestamp_ms: int


@dataclass(frozen=True)
class PostRecord:
    id: str
    entity: str
    timestamp_ms: int


@dataclass(frozen=True)
class ServerRecord:
    name: str
    parallel: int
    budget_bytes: int | None
    peak_bytes: int
    loads: Mapping[str, int]            # model -> instances loaded during the run
    peak_in_flight: int
    loading: int = 0                    # instances still loading when the run stopped


@dataclass(frozen=True)
class SlotSample:
    t: float                            # epoch seconds
    total: int                          # slot rows on usable servers at that moment
    busy: int = 0                       # of which held by a job
    backlog: int = 0                    # runnable queued jobs at that moment
    stranded: int = 0                   # idle servers with room beside ≥ 2 × a model's slots of its jobs waiting
    # Slots whose model had work for them (Σ per model min(its slots, held + queued)): the most that could
    # have been busy at that moment without changing what is resident. 0 = not sampled (old dumps).
    servable: int = 0


@dataclass(frozen=True)
class BaselineFigures:
    policy: str
    makespan_seconds: float
    loads: int
    load_seconds: float
    service_seconds: float
    p50_wait_seconds: float | None
    p95_wait_seconds: float | None
    speedup: float | None               # baseline makespan / ours


@dataclass(frozen=True)
class Report:
    speed: float
    seed: int
    posted: int
    replies: int
    answered_once: int
    answered_twice_or_more: int
    unanswered: int
    job_states: dict[str, int]
    all_answered_exactly_once: bool
    p50_wait_seconds: float | None
    p95_wait_seconds: float | None
    p50_latency_seconds: float | None
    p95_latency_seconds: float | None
    makespan_seconds: float | None
    replies_per_minute: float | None
    busy_slot_seconds: float
    available_slot_seconds: float
    slot_utilisation: float | None
    servers: list[dict[str, Any]]
    loads_per_model: dict[str, dict[str, int]]
    baseline: list[BaselineFigures]
    loads_in_progress: int = 0          # model loads still running when the run stopped
    notes: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)   # database, workers, duration: how the run was set up
    backlog_utilisation: float | None = None    # held / total slot-seconds while a backlog existed
    # held / servable slot-seconds while a backlog existed: how well the workers kept the slots that had
    # work busy; the gap to backlog_utilisation is slots resident for models nobody was waiting for.
    backlog_servable_utilisation: float | None = None
    stranded_seconds: float = 0.0               # idle server with room beside a waiting backlog (target 0)
    replicas: dict[str, list[str]] = field(default_factory=dict)   # model -> servers that loaded it


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]), as Postgres' percentile_cont; None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected 0..100, got {q!r}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def reply_counts(posted: Sequence[PostRecord], replies: Sequence[ReplyRecord]) -> Counter[str]:
    """Replies per posted message id (every posted id present, 0 when unanswered)."""
    counts: Counter[str] = Counter({p.id: 0 for p in posted})
    for r in replies:
        if r.reply_to in counts:
            counts[r.reply_to] += 1
    return counts


def latencies(posted: Sequence[PostRecord], replies: Sequence[ReplyRecord]) -> list[float]:
    """Seconds from each human post to its first reply at the chat server."""
    first: dict[str, int] = {}
    for r in replies:
        first[r.reply_to] = min(first.get(r.reply_to, r.timestamp_ms), r.timestamp_ms)
    return [(first[p.id] - p.timestamp_ms) / 1000 for p in posted if p.id in first]


def waits(jobs: Sequence[JobRecord]) -> list[float]:
    return [j.claimed_at - j.created_at for j in jobs if j.state == "done" and j.claimed_at is not None]


def busy_slot_seconds(jobs: Sequence[JobRecord]) -> float:
    """A claim holds one slot row from claim until the job leaves `running`."""
    return sum(j.finished_at - j.claimed_at for j in jobs
               if j.state in ("done", "skipped") and j.claimed_at is not None and j.finished_at is not None)


def available_slot_seconds(samples: Sequence[SlotSample], start: float, end: float) -> float:
    """∫ slots dt over [start, end], each sample's total holding until the next sample (step function)."""
    if end <= start:
        return 0.0
    pts = sorted(samples, key=lambda s: s.t)
    total = 0.0
    for i, s in enumerate(pts):
        seg_start = max(s.t, start)
        seg_end = min(pts[i + 1].t if i + 1 < len(pts) else end, end)
        if seg_end > seg_start:
            total += s.total * (seg_end - seg_start)
    return total


def backlog_utilisation(samples: Sequence[SlotSample], start: float, end: float) -> float | None:
    """Held / total slot-seconds over the sampled moments when runnable work was queued (a backlog):
    the capacity the scheduler left idle while people waited."""
    pts = sorted(samples, key=lambda s: s.t)
    busy = total = 0.0
    for i, s in enumerate(pts):
        seg = min(pts[i + 1].t if i + 1 < len(pts) else end, end) - max(s.t, start)
        if seg > 0 and s.backlog > 0:
            busy += s.busy * seg
            total += s.total * seg
    return busy / total if total else None


def backlog_servable_utilisation(samples: Sequence[SlotSample], start: float, end: float) -> float | None:
    """Held / servable slot-seconds while a backlog existed. A slot of a model with no queued job cannot be
    busy whatever the dispatcher does, so this separates "the workers left work waiting beside a usable
    slot" (low here) from "the resident models were not the ones people wanted" (low only in the total)."""
    pts = sorted(samples, key=lambda s: s.t)
    busy = total = 0.0
    for i, s in enumerate(pts):
        seg = min(pts[i + 1].t if i + 1 < len(pts) else end, end) - max(s.t, start)
        if seg > 0 and s.backlog > 0 and s.servable > 0:
            busy += min(s.busy, s.servable) * seg
            total += s.servable * seg
    return busy / total if total else None


def stranded_seconds(samples: Sequence[SlotSample], start: float, end: float) -> float:
    """Seconds during which some idle server had room while ≥ 2 × a model's slots of its jobs waited."""
    pts = sorted(samples, key=lambda s: s.t)
    out = 0.0
    for i, s in enumerate(pts):
        seg = min(pts[i + 1].t if i + 1 < len(pts) else end, end) - max(s.t, start)
        if seg > 0 and s.stranded:
            out += seg
    return out


def loads_per_model(servers: Sequence[ServerRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in servers:
        for model, n in s.loads.items():
            if n:
                out.setdefault(model, {})[s.name] = n
    return dict(sorted(out.items()))


def baseline_figures(run: SequentialRun, ours: float | None) -> BaselineFigures:
    return BaselineFigures(run.policy, run.makespan, run.loads, run.load_seconds, run.service_seconds,
                           percentile(run.waits, 50), percentile(run.waits, 95),
                           run.makespan / ours if ours else None)


def build_report(*, posted: Sequence[PostRecord], jobs: Sequence[JobRecord], replies: Sequence[ReplyRecord],
                 servers: Sequence[ServerRecord], samples: Sequence[SlotSample], baseline: Sequence[SequentialRun],
                 speed: float, seed: int, context: Mapping[str, Any] | None = None) -> Report:
    counts = reply_counts(posted, replies)
    posted_ids = {p.id for p in posted}
    own_jobs = [j for j in jobs if j.message_id in posted_ids]
    states = Counter(j.state for j in own_jobs)
    ours_replies = [r for r in replies if r.reply_to in posted_ids]
    once = sum(1 for n in counts.values() if n == 1)
    twice = sum(1 for n in counts.values() if n > 1)
    unanswered = sum(1 for n in counts.values() if n == 0)
    w, lat = waits(own_jobs), latencies(posted, ours_replies)
    makespan = None
    if posted and ours_replies:
        makespan = max(r.timestamp_ms for r in ours_replies) / 1000 - min(p.timestamp_ms for p in posted) / 1000
    busy = busy_slot_seconds(own_jobs)
    available = 0.0
    start = 0.0
    if makespan:
        start = min(p.timestamp_ms for p in posted) / 1000
        available = available_slot_seconds(samples, start, start + makespan)
    notes = []
    if unanswered:
        notes.append(f"{unanswered} message(s) got no reply (job states: {dict(states)})")
    if twice:
        notes.append(f"{twice} message(s) were answered more than once")
    server_rows = [{"server": s.name, "parallel": s.parallel, "peak_ram_bytes": s.peak_bytes,
                    "budget_bytes": s.budget_bytes,
                    "peak_ram_fraction": s.peak_bytes / s.budget_bytes if s.budget_bytes else None,
                    "within_budget": s.budget_bytes is None or s.peak_bytes <= s.budget_bytes,
                    "loads": sum(s.loads.values()), "loading": s.loading,
                    "peak_in_flight": s.peak_in_flight} for s in servers]
    for row in server_rows:
        if not row["within_budget"]:
            notes.append(f"{row['server']}: peak RAM {fmt_bytes(row['peak_ram_bytes'])} exceeded the budget "
                         f"{fmt_bytes(row['budget_bytes'])}")
    return Report(
        speed=speed, seed=seed, posted=len(posted), replies=len(ours_replies), answered_once=once,
        answered_twice_or_more=twice, unanswered=unanswered, job_states=dict(sorted(states.items())),
        all_answered_exactly_once=bool(posted) and once == len(posted),
        p50_wait_seconds=percentile(w, 50), p95_wait_seconds=percentile(w, 95),
        p50_latency_seconds=percentile(lat, 50), p95_latency_seconds=percentile(lat, 95),
        makespan_seconds=makespan,
        replies_per_minute=len(ours_replies) / makespan * 60 if makespan else None,
        busy_slot_seconds=busy, available_slot_seconds=available,
        slot_utilisation=busy / available if available else None,
        backlog_utilisation=backlog_utilisation(samples, start, start + makespan) if makespan else None,
        backlog_servable_utilisation=(backlog_servable_utilisation(samples, start, start + makespan)
                                      if makespan else None),
        stranded_seconds=stranded_seconds(samples, start, start + makespan) if makespan else 0.0,
        replicas={m: sorted(by) for m, by in loads_per_model(servers).items() if len(by) > 1},
        servers=server_rows, loads_per_model=loads_per_model(servers),
        baseline=[baseline_figures(run, makespan) for run in baseline],
        loads_in_progress=sum(s.loading for s in servers), notes=notes, context=dict(context or {}),
    )


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2, sort_keys=False, default=str)


# --------------------------------------------------------------------------------------------- text

def secs(value: float | None) -> str:
    """Seconds readable at any --speed: milliseconds below one second."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if abs(value) < 1 else fmt_seconds(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


BASELINE_LABEL = {
    "switch": "original, as it ran (1 worker, LM Studio JIT auto-evict: a load at every model switch)",
    "warm": "original, best case (1 worker, every model kept loaded after its first use)",
}


def _table(rows, columns, **kw) -> str:
    return to_text(table(rows, columns, **kw)).rstrip("\n")


def loads_empty_note(r: Report) -> str:
    """Why the loads table is empty: every model was resident already, or the run stopped first."""
    if r.loads_in_progress:
        return f"(none finished; {r.loads_in_progress} load(s) were still running when the run stopped)"
    return "(none: every model the messages needed was already loaded)"


def format_report(r: Report) -> str:
    out = [f"aibot demo report  (seed {r.seed}, speed {r.speed:g}: every simulated duration × {r.speed:g}; "
           "times below are wall-clock seconds of this run)", ""]
    verdict = "every message answered exactly once" if r.all_answered_exactly_once else "NOT every message answered exactly once"
    out.append(f"Messages  posted {r.posted}, replies {r.replies}: {verdict} "
               f"(once {r.answered_once}, more than once {r.answered_twice_or_more}, unanswered {r.unanswered})")
    out.append(f"          job states: {', '.join(f'{k} {v}' for k, v in r.job_states.items()) or '-'}")
    out.append(f"Wait      (claimed − created)       p50 {secs(r.p50_wait_seconds)}, p95 {secs(r.p95_wait_seconds)}")
    out.append(f"Latency   (reply − human post)      p50 {secs(r.p50_latency_seconds)}, p95 {secs(r.p95_latency_seconds)}")
    rpm = "-" if r.replies_per_minute is None else f"{r.replies_per_minute:.1f}"
    out.append(f"Makespan  (first post → last reply) {secs(r.makespan_seconds)}, {rpm} replies/min")
    out.append(f"Slots     utilisation {pct(r.slot_utilisation)} = busy {r.busy_slot_seconds:.1f} / available "
               f"{r.available_slot_seconds:.1f} slot-seconds; while a backlog existed {pct(r.backlog_utilisation)} "
               f"of all slots, {pct(r.backlog_servable_utilisation)} of the slots whose model had work queued")
    out.append(f"Idle      seconds with a server idle (free memory, free slots) beside ≥ 2 × a model's slots "
               f"of its jobs waiting: {r.stranded_seconds:.0f}")
    out.append(f"Replicas  {', '.join(f'{m} on {len(s)} servers' for m, s in r.replicas.items()) or 'none'}")
    out.append("")
    out.append(_table(r.servers, [
        "server", "parallel", Column("peak_ram_bytes", "peak RAM", fmt_bytes), Column("budget_bytes", "budget", fmt_bytes),
        Column("peak_ram_fraction", "of budget", pct), Column("within_budget", "within"),
        Column("peak_in_flight", "peak in flight"), "loads"], title="Servers (simulator counters)"))
    out.append("")
    out.append(_table([{"model": m, "loads": sum(by.values()), "where": ", ".join(f"{s} ×{n}" for s, n in by.items())}
                       for m, by in r.loads_per_model.items()], ["model", "loads", "where"],
                      title="Model loads", empty=loads_empty_note(r)))
    if r.loads_per_model and r.loads_in_progress:
        out.append(f"  (+{r.loads_in_progress} load(s) still running when the run stopped)")
    out.append("")
    out.append("Same messages, original bot (one sequential worker; computed from this run's recording, see docs/demo.md):")
    for b in r.baseline:
        out.append(f"  {BASELINE_LABEL.get(b.policy, b.policy)}")
        if b.speedup is None or not b.makespan_seconds:
            out.append("    not computed: no message was answered in this run, so there is nothing to replay")
            continue
        out.append(f"    makespan {secs(b.makespan_seconds)} = generating {secs(b.service_seconds)} + {b.loads} load(s) "
                   f"{secs(b.load_seconds)} + idle; wait p50 {secs(b.p50_wait_seconds)}, p95 {secs(b.p95_wait_seconds)}"
                   f"  → aibot is {b.speedup:.1f}× faster")
    if r.notes:
        out.append("")
        out.extend(f"NOTE: {n}" for n in r.notes)
    return "\n".join(out)
