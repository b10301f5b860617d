"""The cluster as Postgres records it, read for decisions: server rows, resident models, slot counts,
queued demand, and the servers as `aibot.cluster.placement` sees them.

The usable-server rule (enabled, not draining, not down, not backed off) is the `usable_servers` view
of `0002_queue.sql` and nothing else: the claim, the doorbells and every query here read it, and
Python reads the `usable` column they return. Whether aibot can load models on a server comes from
its kind's backend class (`aibot.backends.registry`).

This module owns the shared reads and the record of a resident model (`record_instance`, written by
the refresh and by the loader); it makes no HTTP call and changes no slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import psycopg

from aibot import db
from aibot.backends import registry
from aibot.backends.base import LoadedModel, Offered
from aibot.cluster import health
from aibot.cluster.demand import ModelDemand
from aibot.cluster.placement import Resident, ServerView
from aibot.cluster.sizing import Budget, Instance

queries = db.Queries(__name__)

#: Instance states (as a server lists them) that hold memory and can, or soon will, serve.
LIVE_STATES = ("loaded", "loading", "sleeping")


def now(conn: psycopg.Connection) -> datetime:
    """The database clock, so residency and backoff decisions do not depend on each host's clock."""
    return queries.one(conn, "cluster_now")["now"]


def servers(conn: psycopg.Connection) -> list[dict]:
    """Every server row, in name order, with `usable` from the `usable_servers` view."""
    return queries.all(conn, "cluster_servers")


def server_by_id(conn: psycopg.Connection, server_id: int) -> dict | None:
    return queries.one(conn, "cluster_server_by_id", {"server_id": server_id})


def server_by_name(conn: psycopg.Connection, name: str) -> dict | None:
    return queries.one(conn, "cluster_server_by_name", {"name": name})


def instances(conn: psycopg.Connection, server_id: int | None = None) -> list[dict]:
    """Resident models with their requests in flight (`held`) and last use, of one server or all."""
    return queries.all(conn, "cluster_instances", {"server_id": server_id})


def as_instances(rows: Iterable[Mapping[str, Any]]) -> list[Instance]:
    """`instances` rows as the sizing formula counts them (a draining model: memory, no slots)."""
    return [Instance(r["model"], int(r["size_bytes"]), int(r["parallel"]),
                     "unloading" if r.get("draining") and r["state"] == "loaded" else r["state"]) for r in rows]


def slot_counts(conn: psycopg.Connection, server_id: int | None = None) -> list[dict]:
    """Slot rows per (server, model): free, held, retired-and-held, retired-and-free."""
    return queries.all(conn, "cluster_slot_counts", {"server_id": server_id})


def lock_server_slots(conn: psycopg.Connection, server_id: int) -> None:
    """Locks a server's slot rows to the end of the transaction; claims skip them meanwhile."""
    queries.run(conn, "cluster_lock_server_slots", {"server_id": server_id})


def residency(conn: psycopg.Connection, model: str) -> list[dict]:
    """Where `model` is resident, in which state, and whether that server is usable now."""
    return queries.all(conn, "cluster_model_residency", {"model": model})


def recorded_models(conn: psycopg.Connection, server_id: int) -> list[dict]:
    """The models aibot records on one server, with their origin and the server's instance id."""
    return queries.all(conn, "cluster_server_models", {"server_id": server_id})


def queued_demand(conn: psycopg.Connection) -> dict[str, int]:
    """Queued jobs per model: the demand the slot split and the eviction order prefer."""
    return {r["model"]: r["queued"] for r in queries.all(conn, "cluster_queued_demand")}


#: Arrivals over this window make a model's recent rate (jobs per second).
RATE_WINDOW_SECONDS = 120.0


def model_demand(conn: psycopg.Connection, window_s: float = RATE_WINDOW_SECONDS) -> dict[str, ModelDemand]:
    """Every model's demand at this instant, as `aibot.cluster.demand` weighs it."""
    return {r["model"]: ModelDemand(r["model"], r["queued"], float(r["oldest_wait_s"]), r["recent"] / window_s,
                                    r["inflight"], r["load_s"], service_s=r["service_s"])
            for r in queries.all(conn, "cluster_model_demand", {"window_s": window_s})}


def dispatch_cap(conn: psycopg.Connection) -> dict:
    """The cluster-wide cap on generations in flight (`max_in_flight`, None: none) and how many run."""
    return queries.one(conn, "cluster_dispatch_cap") or {"max_in_flight": None, "generating": 0}


def unplaced_demand(conn: psycopg.Connection) -> list[dict]:
    """Runnable models that no usable server holds or is loading, best-ranked job first."""
    return queries.all(conn, "cluster_unplaced_demand")


def catalog_size(conn: psycopg.Connection, model: str) -> dict | None:
    """A model's last known size and where it came from (`model_catalog`)."""
    return queries.one(conn, "cluster_catalog_get", {"model": model})


def remember_size(conn: psycopg.Connection, model: str, size_bytes: int, *, parallel: int | None,
                  context_length: int | None, source: str) -> None:
    """Keeps a model's real size so it can be placed when it is loaded nowhere."""
    queries.run(conn, "cluster_catalog_upsert", {"model": model, "size_bytes": size_bytes, "parallel": parallel,
                                                 "context_length": context_length, "size_source": source})


def primary_instance(live: list[LoadedModel]) -> LoadedModel:
    """The instance requests go to: a loaded one before a sleeping or loading one, then the first listed."""
    order = {"loaded": 0, "sleeping": 1, "loading": 2}
    return min(live, key=lambda i: order.get(i.state, 3))


def live_instances(offered: Offered) -> list[LoadedModel]:
    """The instances of a catalogue entry that hold memory and can (or soon will) serve."""
    return [i for i in offered.instances if i.state in LIVE_STATES]


def record_instance(conn: psycopg.Connection, server_id: int, model: str, offered: Offered,
                    live: list[LoadedModel], *, state: str, origin: str, loader: bool,
                    size_bytes: int | None = None) -> dict:
    """Records `model`'s live instances on a server under the configured name (one row per model).

    `loader=True` (the loader, holding the model's lock) writes the state as given; a refresh does not
    undo an eviction in progress nor declare our own load done (see cluster_upsert_instance).
    """
    primary = primary_instance(live)
    size = size_bytes if size_bytes is not None else sum(i.size_bytes for i in live) or (offered.size_bytes or 0) * len(live)
    return queries.one(conn, "cluster_upsert_instance", {
        "server_id": server_id, "model": model, "state": state, "size_bytes": size,
        "parallel": max(1, primary.parallel or 1), "context_length": primary.context_length,
        "instance_id": primary.key, "instances": len(live), "origin": origin, "ttl_seconds": primary.ttl_seconds,
        "loader": loader})


def can_load(kind: str) -> bool:
    """Whether aibot can load models on this kind of server (its backend class says)."""
    return kind in registry.kinds() and registry.can_load(kind)


def _blocked_reason(row: Mapping[str, Any]) -> str:
    if row["unavailable_reason"]:
        return f"refused: {row['unavailable_reason']}"
    return f"backed off until {row['backoff_until']:%H:%M:%S} after: {row['last_error']}"


def server_views(conn: psycopg.Connection) -> list[ServerView]:
    """Every server as `aibot.cluster.placement` sees it (residents with requests in flight, the models
    it refused or backed off, its own eviction bound)."""
    residents: dict[int, list[Resident]] = {}
    for r in instances(conn):
        residents.setdefault(r["server_id"], []).append(Resident(
            r["model"], int(r["size_bytes"]), int(r["parallel"]), r["state"], int(r["held"]),
            r["loaded_at"], r["last_used_at"], r["load_seconds"], bool(r.get("draining"))))
    blocked: dict[int, dict[str, str]] = {}
    for (sid, model), row in health.blocked_pairs(conn).items():
        blocked.setdefault(sid, {})[model] = _blocked_reason(row)
    return [ServerView(s["id"], s["name"], Budget.from_row(s), tuple(residents.get(s["id"], ())),
                       can_load=bool(s["usable"]) and can_load(s["kind"]),
                       default_parallel=int(s.get("default_parallel") or 1),
                       blocked=blocked.get(s["id"], {}), max_models=s.get("max_loaded"),
                       memory_source=s.get("memory_source"))
            for s in servers(conn)]
