"""Cluster state in Postgres: servers from config, what each server holds, and slot rows sized to fit.

The decisions live in `aibot.sizing` and `aibot.placement` (pure); this module is the I/O around them:
reading backends, writing `servers`/`model_instances`, and keeping the `slots` rows of every
(server, model) equal to the sizing result — because a claim can only take a slot row that exists,
the row count *is* the concurrency limit, for any number of workers on any number of hosts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg

from aibot import db, health
from aibot.backends import identity
from aibot.backends.base import Backend, BackendError, LoadedModel, Offered, unknown_model
from aibot.placement import Resident, ServerView, SlotChange, server_slot_changes, server_targets
from aibot.sizing import Budget, Instance, SizingResult, choose_memory, server_slots, worker_command

logger = logging.getLogger("aibot.cluster")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


# ---------------------------------------------------------------------------------------------------
# Servers from config
# ---------------------------------------------------------------------------------------------------

MAX_PARALLEL_LOADS = 4   # model loads one scheduler tick or worker starts at once


def is_local_url(url: str) -> bool:
    """Whether the server runs on this machine, so psutil's RAM is its RAM."""
    host = (urlsplit(url).hostname or "").lower()
    names = LOCAL_HOSTS | {socket.gethostname().lower(), socket.getfqdn().lower()}
    return host in names


def local_memory_bytes() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return int(psutil.virtual_memory().total)


def _memory_for(url: str, reported: int | None, configured: int | None) -> tuple[int | None, str | None]:
    host_total = local_memory_bytes() if not (reported or configured) and is_local_url(url) else None
    return choose_memory(reported, configured, host_total)


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)


def sync_servers(conn: psycopg.Connection, servers: Iterable[Any]) -> SyncResult:
    """Upserts the `servers` table from config (`ServerConfig`s), by name.

    A server that left the config is kept (its history, its in-flight work) but disabled, so claims
    stop sending it work. A RAM figure the server itself reported is not overwritten by config.
    """
    result = SyncResult()
    names = []
    with conn.transaction():
        for cfg in servers:
            if not cfg.name:
                raise ValueError(f"server config without a name: url={getattr(cfg, 'url', None)!r}")
            if cfg.name in names:
                raise ValueError(f"servers[].name {cfg.name!r} appears twice in the config")
            names.append(cfg.name)
            existing = db.one(conn, "cluster_server_by_name", {"name": cfg.name})
            reported = existing["memory_bytes"] if existing and existing["memory_source"] == "server" else None
            memory, source = _memory_for(cfg.url, reported, cfg.memory_bytes)
            row = db.one(conn, "cluster_upsert_server", {
                "name": cfg.name, "url": cfg.url, "kind": cfg.kind, "enabled": bool(cfg.enabled),
                "configured_memory_bytes": cfg.memory_bytes, "memory_bytes": memory, "memory_source": source,
                "system_reserve_bytes": int(cfg.system_reserve_bytes), "safety_fraction": float(cfg.safety_fraction),
                "per_request_bytes": int(cfg.per_request_bytes), "hard_cap": int(cfg.hard_cap),
                "default_parallel": int(cfg.default_parallel), "token_env": cfg.token_env,
                "configured_max_loaded": getattr(cfg, "max_loaded_models", None),
            })
            (result.added if row["inserted"] else result.updated).append(cfg.name)
        result.disabled = [r["name"] for r in db.all_rows(conn, "cluster_disable_missing_servers", {"names": names})]
    if result.disabled:
        logger.info("servers no longer in config, disabled: %s", ", ".join(result.disabled))
    return result


def backend_for_row(row: Mapping[str, Any], timeouts=None) -> Backend:
    """The backend for a `servers` row (its token from `token_env` or `<token_env>_FILE`)."""
    from aibot.backends.factory import backend_for_server

    return backend_for_server(row, timeouts=timeouts)


# ---------------------------------------------------------------------------------------------------
# Refresh: what each server holds
# ---------------------------------------------------------------------------------------------------

@dataclass
class RefreshResult:
    server: str
    ok: bool
    models: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)     # configured names this server does not offer
    memory_bytes: int | None = None
    memory_source: str | None = None
    error: str | None = None


def _resident_state(listed: str) -> str:
    """Our row state for an instance the server lists as `listed`.

    A model the server is loading by itself (llama.cpp autoload on a chat request, LM Studio JIT, a
    reload after someone unloaded it underneath us) serves requests as soon as it is ready and holds
    them meanwhile, so it keeps its slots ('loaded'). Only our own loader's reservation is 'loading'
    (zero slots), and the refresh never overrides that row (cluster_upsert_instance). A sleeping
    router model wakes on the next request: resident, serving.
    """
    return "loaded" if listed in ("loaded", "loading", "sleeping") else listed


def _pick_primary(instances: list[LoadedModel]) -> LoadedModel:
    """The instance requests go to: a loaded one before a sleeping or loading one, then the first listed."""
    order = {"loaded": 0, "sleeping": 1, "loading": 2}
    return min(instances, key=lambda i: order.get(i.state, 3))


def refresh_server(conn: psycopg.Connection, server_row: Mapping[str, Any], backend: Backend,
                   wanted: Iterable[str] = (), *, config_fingerprint: str | None = None) -> RefreshResult:
    """Lists the server's catalogue into `model_instances` and records its RAM.

    Every model aibot knows (the configured names in `wanted`, and those it already records here) is
    looked up in the catalogue with the server kind's identity rules (`aibot.backends.identity`), and
    its loaded instances are recorded under the configured name with the server's instance id, so a
    naming difference never forgets a model. Instances no known name matches still take memory, so
    they are recorded under the server's name (origin 'server'). A configured name the server does not
    offer (on a catalogue that lists everything) is refused for this server with the names it offers.

    HTTP first, then one short transaction. Vanished models are forgotten, except a row in state
    'loading' whose loader is alive (it holds the (server, model) lock). A failing listing counts as a
    server fault; a failing per-model detail only degrades that model's entry (the backend's job).
    """
    name = server_row["name"]
    try:
        catalogue = identity.catalogue_of(backend)
    except BackendError as exc:
        error = f"refresh: {type(exc).__name__}: {exc}"
        health.record_fault(conn, server_row["id"], error)
        logger.warning("refresh of %s failed: %s", name, error)
        return RefreshResult(name, False, error=error)
    try:
        reported = backend.health().memory_bytes
    except BackendError:
        reported = None
    memory, source = _memory_for(server_row["url"], reported, server_row.get("configured_memory_bytes"))
    result = RefreshResult(name, True, memory_bytes=memory, memory_source=source)
    sid = server_row["id"]

    with conn.transaction():
        # The catalogue first: refusals made under an older model list are retried, and new ones are
        # recorded under this one.
        fingerprint = catalogue.fingerprint()
        db.run(conn, "cluster_set_catalogue", {"server_id": sid, "fingerprint": fingerprint,
                                               "max_loaded": catalogue.max_loaded})
        retried = db.all_rows(conn, "health_clear_stale_refusals", {"server_id": sid, "fingerprint": fingerprint})
        if retried:
            logger.info("server %s: its model list changed; will try again: %s", name,
                        ", ".join(r["model"] for r in retried))
        known = {r["model"]: r for r in db.all_rows(conn, "cluster_server_models", {"server_id": sid})}
        wanted = set(wanted)
        found: dict[str, tuple[Offered, list[LoadedModel]]] = {}
        entries: dict[str, Offered] = {}
        claimed: set[str] = set()
        # Configured and queued names claim instances first: a row recorded under the server's own name
        # (someone else's load) must never take an instance away from the name the jobs use.
        for model in sorted(wanted) + sorted(set(known) - wanted):
            offered = identity.identify(backend, model, catalogue)
            if offered is not None:
                entries[model] = offered
            else:
                if model in wanted and catalogue.complete:
                    reason = str(unknown_model(model, catalogue, f"server {name}"))
                    if health.mark_unavailable(conn, sid, model, reason, config_fingerprint):
                        logger.warning("%s", reason)
                    result.refused.append(model)
                continue
            live = [i for i in offered.instances if i.state in ("loaded", "loading", "sleeping")
                    and i.key not in claimed]
            if live:
                found[model] = (offered, live)
                claimed.update(i.key for i in live)
        for inst in catalogue.instances():   # loaded by someone else, under a name no config uses
            if inst.key not in claimed and inst.state in ("loaded", "loading", "sleeping"):
                found.setdefault(inst.key, (Offered(inst.key, size_bytes=inst.size_bytes or None), [inst]))
                claimed.add(inst.key)

        # Sizes the server reports (loaded or not), so placement never has to assume one.
        for model, offered in {**{m: o for m, (o, _) in found.items()}, **entries}.items():
            each = offered.size_bytes or next((i.size_bytes for i in found.get(model, (None, []))[1]
                                               if i.size_bytes), 0)
            if each:
                db.run(conn, "cluster_catalog_upsert", {
                    "model": model, "size_bytes": each, "parallel": None,
                    "context_length": offered.max_context_length, "size_source": f"server {name}"})

        for model, (offered, live) in found.items():
            primary = _pick_primary(live)
            origin = known[model]["origin"] if model in known else "server"
            if offered.detail and model in known:
                # A per-model detail failed (its /props timed out while it was busy): the listing still
                # shows it resident, but its parallel and context are unknown this time, so keep what we
                # knew rather than shrinking its slots to the default under the requests in flight.
                primary = dataclasses.replace(primary, parallel=known[model]["parallel"],
                                              context_length=known[model]["context_length"] or primary.context_length)
            size = sum(i.size_bytes for i in live) or (offered.size_bytes or 0) * len(live)
            if size <= 0:
                cat = db.one(conn, "cluster_catalog_get", {"model": model})
                size = int(cat["size_bytes"]) * len(live) if cat else 0
            row = db.one(conn, "cluster_upsert_instance", {
                "server_id": sid, "model": model, "state": _resident_state(primary.state),
                "size_bytes": size, "parallel": max(1, primary.parallel or 1),
                "context_length": primary.context_length, "instance_id": primary.key, "instances": len(live),
                "origin": origin, "ttl_seconds": primary.ttl_seconds, "loader": False})
            if row["inserted"]:
                result.added.append(model)
        gone = db.all_rows(conn, "cluster_delete_vanished_instances", {"server_id": sid, "models": list(found)})
        result.removed = [g["model"] for g in gone]
        db.run(conn, "cluster_set_memory", {"server_id": sid, "memory_bytes": memory, "memory_source": source})
    result.models = sorted(found)
    if result.added or result.removed:
        logger.info("server %s: +%s -%s", name, result.added, result.removed)
    return result


# ---------------------------------------------------------------------------------------------------
# Rebalance: slot rows = sizing result
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotDelta:
    server_id: int
    server: str
    model: str
    before: int          # active rows (free + held, not retired) before
    after: int           # active rows after (the target, unless held rows still use the room)
    change: SlotChange


def _instances(rows: Iterable[Mapping[str, Any]]) -> list[Instance]:
    return [Instance(r["model"], int(r["size_bytes"]), int(r["parallel"]), r["state"]) for r in rows]


def queued_demand(conn: psycopg.Connection) -> dict[str, int]:
    return {r["model"]: r["queued"] for r in db.all_rows(conn, "cluster_queued_demand")}


def _rebalance_server(conn: psycopg.Connection, server: Mapping[str, Any], demand: Mapping[str, int]) -> list[SlotDelta]:
    deltas = []
    with conn.transaction():
        db.run(conn, "cluster_rebalance_lock", {"server_id": server["id"]})
        db.run(conn, "cluster_lock_server_slots", {"server_id": server["id"]})
        rows = db.all_rows(conn, "cluster_instances", {"server_id": server["id"]})
        instances = _instances(rows)
        budget = Budget.from_row(server)
        if server["enabled"]:
            total = server_slots(budget, instances).slots
            targets = server_targets(budget, instances, demand)
        else:
            total, targets = 0, {}
        counts = {c["model"]: c for c in db.all_rows(conn, "cluster_slot_counts", {"server_id": server["id"]})}
        if any(c["retired_free"] for c in counts.values()):
            db.run(conn, "cluster_delete_stale_retired", {"server_id": server["id"]})
        changes = server_slot_changes(total, targets, {m: (c["free"], c["held"], c["retired_held"])
                                                        for m, c in counts.items()})
        for model, change in sorted(changes.items()):
            if change.empty:
                continue
            c = counts.get(model, {"free": 0, "held": 0})
            params = {"server_id": server["id"], "model": model}
            if change.add:
                db.run(conn, "cluster_add_slots", {**params, "n": change.add})
            if change.unretire:
                db.run(conn, "cluster_unretire_slots", {**params, "n": change.unretire})
            if change.delete_free:
                db.run(conn, "cluster_delete_free_slots", {**params, "n": change.delete_free})
            if change.retire:
                db.run(conn, "cluster_retire_slots", {**params, "n": change.retire})
            after = c["free"] + c["held"] + change.add + change.unretire - change.delete_free - change.retire
            deltas.append(SlotDelta(server["id"], server["name"], model, c["free"] + c["held"], after, change))
    return deltas


def rebalance(conn: psycopg.Connection, demand: Mapping[str, int] | None = None, *,
              server_id: int | None = None) -> list[SlotDelta]:
    """Makes every (server, model)'s slot rows equal to the sizing result; returns what changed.

    Each server is done in its own transaction holding its slot rows locked, so counts are exact while
    concurrent claims (SKIP LOCKED) simply pass it by for those milliseconds. Free rows are added or
    deleted; held rows beyond the new capacity are retired and vanish when their job releases them.
    `demand` (queued jobs per model) steers the split when memory allows fewer slots than Σ parallel;
    None reads it from the queue.
    """
    if demand is None:
        demand = queued_demand(conn)
    servers = db.all_rows(conn, "cluster_servers")
    deltas = []
    for server in servers:
        if server_id is None or server["id"] == server_id:
            deltas.extend(_rebalance_server(conn, server, demand))
    for d in deltas:
        logger.info("slots %s/%s: %d -> %d", d.server, d.model, d.before, d.after)
    return deltas


# ---------------------------------------------------------------------------------------------------
# Views for placement and plan
# ---------------------------------------------------------------------------------------------------

def usable(server: Mapping[str, Any], now) -> bool:
    return bool(server["enabled"] and not server["draining"] and server["health"] != "down"
                and (server["backoff_until"] is None or server["backoff_until"] <= now))


def can_load(kind: str) -> bool:
    """Whether aibot can load models on this kind of server (the backend class says)."""
    from aibot.backends import BACKENDS

    cls = BACKENDS.get(kind)
    return bool(getattr(cls, "can_load", kind not in ("openai", "llamacpp")))


def _blocked_reason(row: Mapping[str, Any]) -> str:
    if row["unavailable_reason"]:
        return f"refused: {row['unavailable_reason']}"
    return f"backed off until {row['backoff_until']:%H:%M:%S} after: {row['last_error']}"


def server_views(conn: psycopg.Connection, now) -> list[ServerView]:
    """Every server as `aibot.placement` sees it (residents with requests in flight, the models it
    refused or backed off, its own eviction bound)."""
    servers = db.all_rows(conn, "cluster_servers")
    residents: dict[int, list[Resident]] = {}
    for r in db.all_rows(conn, "cluster_instances", {"server_id": None}):
        residents.setdefault(r["server_id"], []).append(Resident(
            r["model"], int(r["size_bytes"]), int(r["parallel"]), r["state"], int(r["held"]),
            r["loaded_at"], r["last_used_at"], r["load_seconds"]))
    blocked: dict[int, dict[str, str]] = {}
    for (sid, model), row in health.blocked_pairs(conn).items():
        blocked.setdefault(sid, {})[model] = _blocked_reason(row)
    return [ServerView(s["id"], s["name"], Budget.from_row(s), tuple(residents.get(s["id"], ())),
                       can_load=usable(s, now) and can_load(s["kind"]),
                       default_parallel=int(s.get("default_parallel") or 1),
                       blocked=blocked.get(s["id"], {}), max_models=s.get("max_loaded"),
                       memory_source=s.get("memory_source"))
            for s in servers]


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


def plan(conn: psycopg.Connection, *, processes: int | None = None, live_seconds: float = 300.0) -> Plan:
    """Per server: RAM, models, Σ parallel, memory bound, slots; per worker host: the Dramatiq command.

    Every host is sized to drive all reachable slots by itself, so losing a worker host costs no
    capacity; idle Dramatiq threads cost little (they wait for a doorbell message).
    """
    now = db.one(conn, "cluster_now")["now"]
    demand = queued_demand(conn)
    counts: dict[tuple[int, str], dict] = {
        (c["server_id"], c["model"]): c for c in db.all_rows(conn, "cluster_slot_counts", {"server_id": None})}
    instances: dict[int, list[dict]] = {}
    for r in db.all_rows(conn, "cluster_instances", {"server_id": None}):
        instances.setdefault(r["server_id"], []).append(r)
    servers = []
    total = 0
    for s in db.all_rows(conn, "cluster_servers"):
        rows = instances.get(s["id"], [])
        budget = Budget.from_row(s)
        sizing = server_slots(budget, _instances(rows))
        targets = server_targets(budget, _instances(rows), demand) if s["enabled"] else {}
        models = []
        for r in rows:
            c = counts.get((s["id"], r["model"]), {"free": 0, "held": 0})
            models.append(ModelPlan(r["model"], r["state"], int(r["size_bytes"]), int(r["parallel"]),
                                    targets.get(r["model"], 0), c["free"] + c["held"], int(r["held"])))
        ok = usable(s, now)
        if ok:
            total += sizing.slots
        servers.append(ServerPlan(s["id"], s["name"], s["kind"], s["enabled"], ok, s["health"], s["memory_bytes"],
                                  s["memory_source"], sizing, tuple(models)))
    hosts_rows = db.all_rows(conn, "cluster_worker_hosts", {"live_seconds": live_seconds})
    default_p = processes or max(1, min(os.cpu_count() or 1, total or 1))
    hosts = []
    for h in hosts_rows or [{"host": "*", "processes": 0}]:
        p = processes or max(1, min(h["processes"] or default_p, total or 1))
        p, t, cmd = worker_command(total, p)
        hosts.append(HostPlan(h["host"], h["processes"], p, t, cmd))
    return Plan(tuple(servers), total, tuple(hosts))


# ---------------------------------------------------------------------------------------------------
# Scheduler entry points (aibot.tasks)
# ---------------------------------------------------------------------------------------------------

_stores: dict[str, Any] = {}


@dataclass(frozen=True)
class Configured:
    """What the cluster takes from the entity configuration: its servers, the model names its
    entities resolve to (refresh looks each up on every server) and the configuration's fingerprint."""

    servers: list[Any]
    models: frozenset[str]
    fingerprint: str | None
    config: Any = None


def configured(config_path: str | None = None) -> Configured | None:
    """The (hot-reloaded) entity configuration, or None when there is no usable one.

    None means "do not sync": a missing or broken config must not disable every server.
    """
    try:
        from aibot.config import ConfigStore
        from aibot.config.modelid import configured_model_ids
        from aibot.settings import get_settings

        path = config_path or get_settings().config_path
        if not os.path.exists(path):
            logger.debug("no config at %s; servers are not synced", path)
            return None
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = ConfigStore(path)
        config = store.get()
        return Configured(list(config.servers), frozenset(configured_model_ids(config)), store.fingerprint, config)
    except Exception as exc:  # noqa: BLE001 - a bad config is logged by the store and must not stop refreshes
        logger.error("cannot read servers from the config: %s", exc)
        return None


def refresh_all(database: db.Database, backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_row, *,
                sync: bool = True, config_path: str | None = None) -> str | None:
    """Syncs servers from the config (when there is one), refreshes every enabled server that is not
    down or backed off (a down server is the probe's), then rebalances slots to match."""
    found = configured(config_path) if sync else None
    if found is not None:
        with database.transaction() as conn:
            sync_servers(conn, found.servers)
            retried = db.all_rows(conn, "health_clear_config_refusals", {"config": found.fingerprint})
        if retried:
            logger.info("the configuration changed; will try again: %s",
                        ", ".join(sorted({r["model"] for r in retried})))
    with database.transaction() as conn:
        now = db.one(conn, "cluster_now")["now"]
        servers = [s for s in db.all_rows(conn, "cluster_servers")
                   if s["enabled"] and s["health"] != "down"
                   and (s["backoff_until"] is None or s["backoff_until"] <= now)]
        wanted = {r["model"] for r in db.all_rows(conn, "cluster_wanted_models")}
    if found is not None:
        wanted |= found.models
    results = []
    for s in servers:
        try:
            backend = backend_for(s)
        except ValueError as exc:
            logger.error("cannot refresh server %s: %s", s["name"], exc)
            continue
        try:
            with database.transaction() as conn:
                results.append(refresh_server(conn, s, backend, wanted,
                                              config_fingerprint=found.fingerprint if found else None))
        finally:
            backend.close()
    with database.transaction() as conn:
        deltas = rebalance(conn)
    failed = [r for r in results if not r.ok]
    changed = [r for r in results if r.added or r.removed]
    if not (failed or changed or deltas):
        return None
    parts = [f"{len(results)} server(s) refreshed"]
    if changed:
        parts.append("changed: " + ", ".join(f"{r.server} +{len(r.added)} -{len(r.removed)}" for r in changed))
    if failed:
        parts.append("failed: " + ", ".join(r.server for r in failed))
    if deltas:
        parts.append(f"{len(deltas)} slot pair(s) resized")
    return "; ".join(parts)


_not_loadable: dict[str, str] = {}   # model -> the last reason logged, so a refusal is logged once


def load_for_demand(database: db.Database, *, worker_id: str,
                    backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_row) -> tuple[list[str], list[str]]:
    """Loads every model that queued work needs and no usable server holds, several at once.

    Loads go in parallel (a cold start of six 15 GB models should not take six load times); the loader
    stays single-flight per model cluster-wide and checks memory under each server's row lock, so
    parallel loads can neither duplicate a model nor overcommit a server. Models go in the order of
    their best-ranked job, so aging decides which model waits when memory is short.
    """
    from concurrent.futures import ThreadPoolExecutor

    from aibot import model_loader

    with database.transaction() as conn:
        wanted = db.all_rows(conn, "cluster_unplaced_demand")
    if not wanted:
        return [], []

    def load(w):
        try:
            res = model_loader.ensure_loaded(database, w["model"], backend_for=backend_for, worker_id=worker_id)
            _not_loadable.pop(w["model"], None)
            with database.transaction() as conn:
                from aibot import jobs

                jobs.clear_waiting(conn, w["model"])
            return f"{w['model']}@{res.server}", None
        except model_loader.LoadError as exc:
            reason = f"waiting: {exc}"
            with database.transaction() as conn:
                from aibot import jobs

                jobs.note_waiting(conn, w["model"], reason)
            if _not_loadable.get(w["model"]) != reason:   # once per new reason, not at every pass
                _not_loadable[w["model"]] = reason
                logger.warning("cannot load %s for %d queued job(s): %s", w["model"], w["queued"], exc)
            return None, f"{w['model']} ({exc})"

    loaded, failed = [], []
    with ThreadPoolExecutor(max_workers=min(len(wanted), MAX_PARALLEL_LOADS), thread_name_prefix="aibot-load") as pool:
        for ok, err in pool.map(load, wanted):
            (loaded if ok else failed).append(ok or err)
    return loaded, failed


def rebalance_and_load(database: db.Database,
                       backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_row) -> str | None:
    """Resizes slots, then loads models that queued work needs and no usable server holds."""
    with database.transaction() as conn:
        deltas = rebalance(conn)
    loaded, failed = load_for_demand(database, worker_id="scheduler", backend_for=backend_for)
    if not (deltas or loaded or failed):
        return None
    parts = [f"{len(deltas)} slot pair(s) resized"]
    if loaded:
        parts.append("loaded " + ", ".join(loaded))
    if failed:
        parts.append("not loaded: " + "; ".join(failed))
    return "; ".join(parts)


def probe_due(database: db.Database, backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_row) -> str | None:
    """Probes servers whose backoff expired (and never-checked ones)."""
    states = health.probe_due(database, backend_for)
    if not states:
        return None
    return ", ".join(f"{s.name}: {s.health}" for s in states)
