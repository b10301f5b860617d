"""The capacity plan `aibot plan` prints: per server the sizing formula's terms from live state, per
worker host the Dramatiq command that can drive every reachable slot.

Reads only; the figures are the ones the rebalancer applies (`aibot.cluster.sizing`), so the plan
never disagrees with the slots. Formatting is the CLI's (`aibot.cli.plan_cmd`).

A cold cluster (no model loaded on any server that could serve) would plan 0 slots and one worker
thread, which is exactly wrong for the operator who plans before starting workers: the models arrive
with the first messages. So a cold plan places the configuration's models the way the loader would
(`placement.choose_server`, sizes from `loader.known_size`) and sizes the servers as if they held
them; `Plan.basis` says which of the two the figures rest on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psycopg

from aibot import db
from aibot.cluster import loader, state
from aibot.cluster.configured import configured
from aibot.cluster.placement import Placement, Resident, ServerView, choose_server, server_targets
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
class ColdModel:
    """A configured model in a cold plan: where the loader would put it, or why nowhere."""

    model: str
    size_bytes: int
    size_source: str
    server: str | None          # None: no server can hold it next to the others
    reason: str | None = None   # why not, when server is None


@dataclass(frozen=True)
class Plan:
    servers: tuple[ServerPlan, ...]
    total_slots: int                 # slots on usable servers: what workers can fill right now
    hosts: tuple[HostPlan, ...]      # one per live worker host; a single "*" row when none is known
    basis: str = "live"              # "live": what the servers hold; "config": a cold cluster, planned
                                     # for the configured models placed as the loader would
    cold: tuple[ColdModel, ...] = ()  # basis "config": every configured model and where it would go
    max_in_flight: int | None = None  # queueSettings.maxConcurrentWorkers: cluster-wide cap on generations
    generating: int = 0               # generations in flight now

    @property
    def cap_line(self) -> str:
        """The cap on generations in flight, as `aibot plan` and `aibot status` print it."""
        if self.max_in_flight is None:
            return f"generations in flight: {self.generating} (no cap beyond the slots)"
        return (f"generations in flight: {self.generating} of at most {self.max_in_flight} cluster-wide "
                f"(queueSettings.maxConcurrentWorkers)")


def place_cold(views: list[ServerView], models: list[tuple[str, int, str]], *, now) -> list[ColdModel]:
    """Where the loader would put each configured model on servers that hold none yet, largest first
    (the hardest to fit), each next to the ones placed before it and never evicting them: the state a
    cold cluster reaches once every configured model has been asked for. Pure; `views` are not changed.

    `models` are (model, size bytes, where the size came from). A model no server can take is kept with
    the placement's refusal, so the operator sees why the plan has fewer slots than hoped.
    """
    residents = {v.server_id: list(v.residents) for v in views}
    out = []
    for model, size, source in sorted(models, key=lambda m: (-m[1], m[0])):
        current = [ServerView(v.server_id, v.name, v.budget, tuple(residents[v.server_id]), can_load=v.can_load,
                              default_parallel=v.default_parallel, blocked=v.blocked, max_models=v.max_models,
                              memory_source=v.memory_source) for v in views]
        choice = choose_server(current, model, size, now=now, size_source=source)
        if isinstance(choice, Placement) and not choice.evict:
            view = next(v for v in current if v.server_id == choice.server_id)
            # loaded_at=now: minimum residency keeps the planned models from evicting each other.
            residents[choice.server_id].append(Resident(model, size, view.expected_parallel, "loaded", loaded_at=now))
            out.append(ColdModel(model, size, source, choice.name))
        else:
            why = (f"fits only by evicting {', '.join(choice.evict)}" if isinstance(choice, Placement)
                   else str(choice))
            out.append(ColdModel(model, size, source, None, why))
    return out


def plan(conn: psycopg.Connection, *, processes: int | None = None, live_seconds: float = 300.0,
         config_path: str | None = None) -> Plan:
    """Per server: RAM, models, Σ parallel, memory bound, slots; per worker host: the Dramatiq command.

    Every host is sized to drive all reachable slots by itself, so losing a worker host costs no
    capacity; idle Dramatiq threads cost little (they wait for a doorbell message). With no slot on
    any usable server (a cold cluster), the plan is the configuration's (`_cold_plan`).
    """
    live = _live_plan(conn)
    servers, total, basis, cold = live[0], live[1], "live", ()
    if total == 0:
        found = configured(config_path)
        if found is not None and found.models:
            servers, total, cold = _cold_plan(conn, sorted(found.models), found.config)
            basis = "config"
    cap = state.dispatch_cap(conn)
    return Plan(servers, total, _hosts(conn, total, processes, live_seconds), basis, cold,
                cap["max_in_flight"], int(cap["generating"]))


def _live_plan(conn: psycopg.Connection) -> tuple[tuple[ServerPlan, ...], int]:
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
    return tuple(servers), total


def _cold_plan(conn: psycopg.Connection, models: list[str], config) -> tuple[tuple[ServerPlan, ...], int, tuple[ColdModel, ...]]:
    """The servers sized as if they held the configured models where the loader would put them.

    Servers that are enabled, not draining and can load are planned even when they are down or backed
    off right now: the plan is for when they serve (the state column says they do not yet).
    """
    rows = {s["id"]: s for s in state.servers(conn)}
    views = [ServerView(v.server_id, v.name, v.budget, v.residents,
                        can_load=rows[v.server_id]["enabled"] and not rows[v.server_id]["draining"]
                        and state.can_load(rows[v.server_id]["kind"]),
                        default_parallel=v.default_parallel, blocked=v.blocked, max_models=v.max_models,
                        memory_source=v.memory_source)
             for v in state.server_views(conn)]
    sizes = []
    for model in models:
        size = loader.known_size(conn, model, config) or loader.model_size(conn, model)
        sizes.append((model, size.bytes, size.source))
    cold = place_cold(views, sizes, now=state.now(conn))
    servers = []
    total = 0
    for v in views:
        s = rows[v.server_id]
        planned = [c for c in cold if c.server == v.name]
        expected = v.expected_parallel
        instances = [r.instance() for r in v.residents] + [
            Resident(c.model, c.size_bytes, expected).instance() for c in planned]
        sizing = server_slots(v.budget, instances)
        if v.can_load:
            total += sizing.slots
        targets = server_targets(v.budget, instances, {}) if v.can_load else {}
        models_ = [ModelPlan(r.model, r.state, r.size_bytes, r.parallel, targets.get(r.model, 0), 0, r.held)
                   for r in v.residents]
        models_ += [ModelPlan(c.model, "planned", c.size_bytes, expected, targets.get(c.model, 0), 0, 0)
                    for c in planned]
        servers.append(ServerPlan(s["id"], s["name"], s["kind"], s["enabled"], bool(s["usable"]), s["health"],
                                  s["memory_bytes"], s["memory_source"], sizing, tuple(models_)))
    return tuple(servers), total, tuple(cold)


def _hosts(conn: psycopg.Connection, total: int, processes: int | None, live_seconds: float) -> tuple[HostPlan, ...]:
    hosts_rows = queries.all(conn, "cluster_worker_hosts", {"live_seconds": live_seconds})
    default_p = processes or max(1, min(os.cpu_count() or 1, total or 1))
    hosts = []
    for h in hosts_rows or [{"host": "*", "processes": 0}]:
        p = processes or max(1, min(h["processes"] or default_p, total or 1))
        p, t, cmd = worker_command(total, p)
        hosts.append(HostPlan(h["host"], h["processes"], p, t, cmd))
    return tuple(hosts)
