"""Rebalancing: the `slots` rows of every (server, model) kept equal to the sizing result.

A claim can only take a slot row that exists, so the row count *is* the concurrency limit, for any
number of workers on any number of hosts. The decisions are `aibot.cluster.sizing` and
`aibot.cluster.placement` (pure); this module only applies them under the server's locks. It owns
the slot rows' count; the claim (`aibot.queue`) owns who holds one.

With `clusterSettings.adaptiveConcurrency`, every rebalance (whoever calls it) also reads the pair's
recent generations and caps its `parallel` at the knee of its throughput curve
(`aibot.cluster.concurrency`), so all callers reach the same decision from the same rows and none
undoes another's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from aibot import db
from aibot.cluster import concurrency, state
from aibot.cluster.configured import configured
from aibot.cluster.placement import SlotChange, capped, server_slot_changes, server_targets
from aibot.cluster.sizing import Budget, server_slots

logger = logging.getLogger(__name__)
queries = db.Queries(__name__)

#: Generations older than this no longer describe the pair (another model may share the server now);
#: it is also how often a capped pair re-explores its full parallel: once the samples above its knee
#: age out, the curve past the knee is unknown again and the pair is measured afresh.
SAMPLE_WINDOW_SECONDS = 600.0
#: The most recent generations per pair that are read (bounds the query on a busy pair).
SAMPLE_LIMIT = 400


def adaptive_enabled() -> bool:
    """`clusterSettings.adaptiveConcurrency` of the hot-reloaded config (off without a config)."""
    found = configured()
    cfg = found.config if found is not None else None
    return bool(cfg is not None and cfg.cluster_settings.adaptive_concurrency)


def concurrency_decisions(conn: psycopg.Connection, server_id: int, parallel: Mapping[str, int],
                          current: Mapping[str, int] | None = None) -> dict[str, concurrency.Decision]:
    """The adaptive decision for each loaded model of one server, from its recent generations
    (`current`: the slots each pair has now, kept while they are still a knee)."""
    samples: dict[str, list[concurrency.Sample]] = {}
    for r in queries.all(conn, "cluster_concurrency_samples", {
            "server_id": server_id, "window_s": SAMPLE_WINDOW_SECONDS, "limit": SAMPLE_LIMIT}):
        samples.setdefault(r["model"], []).append(
            concurrency.Sample(concurrency=r["concurrency"], tokens=r["tokens"], seconds=r["seconds"]))
    return concurrency.caps(samples, parallel, current=current)


@dataclass(frozen=True)
class SlotDelta:
    server_id: int
    server: str
    model: str
    before: int          # active rows (free + held, not retired) before
    after: int           # active rows after (the target, unless held rows still use the room)
    change: SlotChange


#: The last adaptive decision logged per (server id, model): logged when it changes, not every tick.
_last_reason: dict[tuple[int, str], tuple[int, str]] = {}


def _server_changes(conn: psycopg.Connection, server: Mapping[str, Any], demand: Mapping[str, int],
                    adaptive: bool) -> tuple[dict[str, dict], dict[str, SlotChange]]:
    """The server's slot counts and the changes that would make them equal to the sizing result."""
    instances = state.as_instances(state.instances(conn, server["id"]))
    budget = Budget.from_row(server)
    counts = {c["model"]: c for c in state.slot_counts(conn, server["id"])}
    caps: dict[str, int] = {}
    if server["enabled"] and adaptive:
        decided = concurrency_decisions(conn, server["id"],
                                        {i.model: i.parallel for i in instances if i.state == "loaded"},
                                        {m: c["free"] + c["held"] for m, c in counts.items()})
        caps = {m: d.slots for m, d in decided.items()}
        for m, d in sorted(decided.items()):
            kind = (d.slots, d.reason.split(":")[0])   # the figures in the reason move every tick
            if _last_reason.get((server["id"], m)) != kind:
                _last_reason[(server["id"], m)] = kind
                logger.info("adaptive concurrency %s/%s: %d slot(s), %s", server["name"], m, d.slots, d.reason)
    if server["enabled"]:
        total = server_slots(budget, capped(instances, caps)).slots
        targets = server_targets(budget, instances, demand,
                                 current={m: c["free"] + c["held"] for m, c in counts.items()}, caps=caps)
    else:
        total, targets = 0, {}
    changes = server_slot_changes(total, targets, {m: (c["free"], c["held"], c["retired_held"])
                                                    for m, c in counts.items()})
    return counts, {m: c for m, c in changes.items() if not c.empty}


def _rebalance_server(conn: psycopg.Connection, server: Mapping[str, Any], demand: Mapping[str, int],
                      adaptive: bool = False) -> list[SlotDelta]:
    """Decides from an unlocked read first: in the steady state nothing changes and no slot row is
    locked, since a completion that frees a locked slot waits for the lock and a claim skips the row
    (every refresh tick used to stall dispatch on the server for the length of this transaction:
    bench/README.md, benchmark 3). Only when rows must change
    does it lock them, and then decides again under the lock, so counts stay exact."""
    counts, changes = _server_changes(conn, server, demand, adaptive)
    if not changes and not any(c["retired_free"] for c in counts.values()):
        return []
    deltas = []
    with conn.transaction():
        queries.run(conn, "cluster_rebalance_lock", {"server_id": server["id"]})
        state.lock_server_slots(conn, server["id"])
        counts, changes = _server_changes(conn, server, demand, adaptive)
        if any(c["retired_free"] for c in counts.values()):
            queries.run(conn, "cluster_delete_stale_retired", {"server_id": server["id"]})
        for model, change in sorted(changes.items()):
            c = counts.get(model, {"free": 0, "held": 0})
            params = {"server_id": server["id"], "model": model}
            if change.add:
                queries.run(conn, "cluster_add_slots", {**params, "n": change.add})
            if change.unretire:
                queries.run(conn, "cluster_unretire_slots", {**params, "n": change.unretire})
            if change.delete_free:
                queries.run(conn, "cluster_delete_free_slots", {**params, "n": change.delete_free})
            if change.retire:
                queries.run(conn, "cluster_retire_slots", {**params, "n": change.retire})
            after = c["free"] + c["held"] + change.add + change.unretire - change.delete_free - change.retire
            deltas.append(SlotDelta(server["id"], server["name"], model, c["free"] + c["held"], after, change))
    return deltas


def rebalance(conn: psycopg.Connection, demand: Mapping[str, int] | None = None, *,
              server_id: int | None = None, adaptive: bool | None = None) -> list[SlotDelta]:
    """Makes every (server, model)'s slot rows equal to the sizing result; returns what changed.

    Each server whose rows must change is done in its own transaction holding its slot rows locked, so
    counts are exact while concurrent claims (SKIP LOCKED) simply pass it by for those milliseconds; a
    server already at its target is only read. Free rows are added or
    deleted; held rows beyond the new capacity are retired and vanish when their job releases them.
    `demand` (queued jobs per model) steers the split when memory allows fewer slots than Σ parallel;
    None reads it from the queue. `adaptive` None follows `clusterSettings.adaptiveConcurrency`.
    """
    if demand is None:
        demand = state.queued_demand(conn)
    deltas = []
    adaptive = adaptive_enabled() if adaptive is None else adaptive
    for server in state.servers(conn):
        if server_id is None or server["id"] == server_id:
            deltas.extend(_rebalance_server(conn, server, demand, adaptive))
    for d in deltas:
        logger.info("slots %s/%s: %d -> %d", d.server, d.model, d.before, d.after)
    return deltas
