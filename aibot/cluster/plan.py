"""The capacity plan `aibot plan` prints: per server the sizing formula's terms from live state, per
worker host the Dramatiq command that can drive every reachable slot.

Reads only; the figures are the ones the rebalancer applies (`aibot.cluster.sizing`), so the plan
never disagrees with the slots. Formatting is the CLI's (`aibot.cli.plan_cmd`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psycopg

from aibot import db
from aibot.cluster import state
from aibot.cluster.placement import server_targets
from aibot.cluster.sizing import Budget, SizingResult, server_slots, worker_command

queries = db.Queries(__name__)


@dataclass(frozen=True)
class ModelPlan:
    model: str
    state: str
    size_bytes: int
    parallel: int
    target: int        # slots the sizing gives it
    rows: int          # active slot rows it has now
    held: int          # requests in flight


@dataclass(frozen=True)
class ServerPlan:
    server_id: int
    name: str
    kind: str
    enabled: bool
    usable: bool
    health: str
    memory_bytes: int | None
    memory_source: str | None
    sizing: SizingResult
    models: tuple[ModelPlan, ...]


@dataclass(frozen=True)
class HostPlan:
    host: str
    live_processes: int
    processes: int
    threads: int
    command: str


@dataclass(frozen=True)
class Plan:
    servers: tuple[ServerPlan, ...]
    total_slots: int                 # slots on usable servers: what workers can fill right now
    hosts: tuple[HostPlan, ...]      # one per live worker host; a single "*" row when none is known
    max_in_flight: int | None = None  # queueSettings.maxConcurrentWorkers: cluster-wide cap on generations
    generating: int = 0               # generations in flight now

    @property
    def cap_line(self) -> str:
        """The cap on generations in flight, as `aibot plan` and `aibot status` print it."""
        if self.max_in_flight is None:
            return f"generations in flight: {self.generating} (no cap beyond the slots)"
        return (f"generations in flight: {self.generating} of at most {self.max_in_flight} cluster-wide "
                f"(queueSettings.maxConcurrentWorkers)")


def plan(conn: psycopg.Connection, *, processes: int | None = None, live_seconds: float = 300.0) -> Plan:
    """Per server: RAM, models, Σ parallel, memory bound, slots; per worker host: the Dramatiq command.

    Every host is sized to drive all reachable slots by itself, so losing a worker host costs no
    capacity; idle Dramatiq threads cost little (they wait for a doorbell message).
    """
    demand = state.queued_demand(conn)
    counts: dict[tuple[int, str], dict] = {(c["server_id"], c["model"]): c for c in state.slot_counts(conn)}
    instances: dict[int, list[dict]] = {}
    for r in state.instances(conn):
        instances.setdefault(r["server_id"], []).append(r)
    servers = []
    total = 0
    for s in state.servers(conn):
        rows = instances.get(s["id"], [])
        budget = Budget.from_row(s)
        sizing = server_slots(budget, state.as_instances(rows))
        current = {m: c["free"] + c["held"] for (sid, m), c in counts.items() if sid == s["id"]}
        targets = server_targets(budget, state.as_instances(rows), demand, current) if s["enabled"] else {}
        models = []
        for r in rows:
            c = counts.get((s["id"], r["model"]), {"free": 0, "held": 0})
            models.append(ModelPlan(r["model"], r["state"], int(r["size_bytes"]), int(r["parallel"]),
                                    targets.get(r["model"], 0), c["free"] + c["held"], int(r["held"])))
        ok = bool(s["usable"])
        if ok:
            total += sizing.slots
        servers.append(ServerPlan(s["id"], s["name"], s["kind"], s["enabled"], ok, s["health"], s["memory_bytes"],
                                  s["memory_source"], sizing, tuple(models)))
    hosts_rows = queries.all(conn, "cluster_worker_hosts", {"live_seconds": live_seconds})
    default_p = processes or max(1, min(os.cpu_count() or 1, total or 1))
    hosts = []
    for h in hosts_rows or [{"host": "*", "processes": 0}]:
        p = processes or max(1, min(h["processes"] or default_p, total or 1))
        p, t, cmd = worker_command(total, p)
        hosts.append(HostPlan(h["host"], h["processes"], p, t, cmd))
    cap = state.dispatch_cap(conn)
    return Plan(tuple(servers), total, tuple(hosts), cap["max_in_flight"], int(cap["generating"]))
