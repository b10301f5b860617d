"""Servers from the configuration, and what each server holds (its catalogue and RAM, over HTTP).

`sync_servers` upserts the `servers` rows from config; `refresh_server` lists one server's catalogue
into `model_instances`; `refresh_all` does both for the whole cluster and then rebalances. Every
listing goes through the server kind's identity rules (`aibot.backends.identity`), the same ones the
loader uses, so a naming difference never forgets a model. This module owns the server rows' config
and memory columns; it never loads or unloads a model (`aibot.cluster.loader` does).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg

from aibot import db
from aibot.backends import identity, registry
from aibot.backends.base import Backend, BackendError, LoadedModel, Offered, unknown_model
from aibot.backends.factory import backend_for_server
from aibot.cluster import health, loader, slots, state
from aibot.cluster.configured import configured
from aibot.cluster.sizing import Budget, choose_memory

logger = logging.getLogger(__name__)
queries = db.Queries(__name__)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


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


def _safety_bytes(memory: int | None, reserve: int, fraction: float) -> int:
    """The sizing's safety margin for these figures, stored on the server row so the `server_health`
    view accounts exactly what `aibot.cluster.sizing` does (the rule lives only there)."""
    return Budget(memory_bytes=memory, system_reserve_bytes=int(reserve), safety_fraction=float(fraction)).safety_bytes


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)


def sync_servers(conn: psycopg.Connection, servers: Iterable[Any]) -> SyncResult:
    """Upserts the `servers` table from config (`ServerConfig`s), by name.

    A server that left the config is kept (its history, its in-flight work) but disabled, so claims
    stop sending it work. A RAM figure the server itself reported is not overwritten by config. A kind
    no backend class declares is refused here, naming the server (the database keeps no list of kinds).
    """
    result = SyncResult()
    names = []
    with conn.transaction():
        for cfg in servers:
            if not cfg.name:
                raise ValueError(f"server config without a name: url={getattr(cfg, 'url', None)!r}")
            if cfg.name in names:
                raise ValueError(f"servers[].name {cfg.name!r} appears twice in the config")
            _check_kind(cfg)
            names.append(cfg.name)
            existing = state.server_by_name(conn, cfg.name)
            reported = existing["memory_bytes"] if existing and existing["memory_source"] == "server" else None
            memory, source = _memory_for(cfg.url, reported, cfg.memory_bytes)
            row = queries.one(conn, "cluster_upsert_server", {
                "name": cfg.name, "url": cfg.url, "kind": cfg.kind, "enabled": bool(cfg.enabled),
                "configured_memory_bytes": cfg.memory_bytes, "memory_bytes": memory, "memory_source": source,
                "system_reserve_bytes": int(cfg.system_reserve_bytes), "safety_fraction": float(cfg.safety_fraction),
                "safety_bytes": _safety_bytes(memory, cfg.system_reserve_bytes, cfg.safety_fraction),
                "per_request_bytes": int(cfg.per_request_bytes), "hard_cap": int(cfg.hard_cap),
                "default_parallel": int(cfg.default_parallel), "token_env": cfg.token_env,
                "configured_max_loaded": getattr(cfg, "max_loaded_models", None),
            })
            (result.added if row["inserted"] else result.updated).append(cfg.name)
        result.disabled = [r["name"] for r in queries.all(conn, "cluster_disable_missing_servers", {"names": names})]
    if result.disabled:
        logger.info("servers no longer in config, disabled: %s", ", ".join(result.disabled))
    return result


def _check_kind(cfg: Any) -> None:
    if cfg.kind not in registry.kinds():
        raise ValueError(f"server {cfg.name!r}: unknown server kind {cfg.kind!r}; expected one of "
                         f"{', '.join(registry.kinds())}")


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


def refresh_server(conn: psycopg.Connection, server_row: Mapping[str, Any], backend: Backend,
                   wanted: Iterable[str] = (), *, config_fingerprint: str | None = None) -> RefreshResult:
    """Lists the server's catalogue into `model_instances` and records its RAM.

    Every model aibot knows (the configured names in `wanted`, and those it already records here) is
    looked up in the catalogue with the server kind's identity rules (`aibot.backends.identity`), and
    its loaded instances are recorded under the configured name with the server's instance id, so a
    naming difference never forgets a model. Instances no known name matches still take memory, so
    they are recorded under the server's name (origin 'server'). A configured name the server does not
    offer (on a catalogue that lists everything) is refused for this server with the names it offers.

    HTTP first, then one short transaction. Vanished models are forgotten, except rows in state
    'loading' (a live loader's, or an orphan that `loader.reap_orphan_loads` settles). A failing listing counts as a
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
        queries.run(conn, "cluster_set_catalogue", {"server_id": sid, "fingerprint": fingerprint,
                                                    "max_loaded": catalogue.max_loaded})
        retried = health.clear_stale_refusals(conn, sid, fingerprint)
        if retried:
            logger.info("server %s: its model list changed; will try again: %s", name, ", ".join(retried))
        known = {r["model"]: r for r in state.recorded_models(conn, sid)}
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
            live = [i for i in state.live_instances(offered) if i.key not in claimed]
            if live:
                found[model] = (offered, live)
                claimed.update(i.key for i in live)
        for inst in catalogue.instances():   # loaded by someone else, under a name no config uses
            if inst.key not in claimed and inst.state in state.LIVE_STATES:
                found.setdefault(inst.key, (Offered(inst.key, size_bytes=inst.size_bytes or None), [inst]))
                claimed.add(inst.key)

        # Sizes the server reports (loaded or not), so placement never has to assume one.
        for model, offered in {**{m: o for m, (o, _) in found.items()}, **entries}.items():
            each = offered.size_bytes or next((i.size_bytes for i in found.get(model, (None, []))[1]
                                               if i.size_bytes), 0)
            if each:
                state.remember_size(conn, model, each, parallel=None, context_length=offered.max_context_length,
                                    source=f"server {name}")

        for model, (offered, live) in found.items():
            origin = known[model]["origin"] if model in known else "server"
            if offered.detail and model in known:
                # A per-model detail failed (its /props timed out while it was busy): the listing still
                # shows it resident, but its parallel and context are unknown this time, so keep what we
                # knew rather than shrinking its slots to the default under the requests in flight.
                primary = state.primary_instance(live)
                live = [dataclasses.replace(primary, parallel=known[model]["parallel"],
                                            context_length=known[model]["context_length"] or primary.context_length),
                        *[i for i in live if i is not primary]]
            size = sum(i.size_bytes for i in live) or (offered.size_bytes or 0) * len(live)
            if size <= 0:   # the server gives no size (an OpenAI-compatible listing): what we know, if anything
                known_size = loader.known_size(conn, model)
                size = known_size.bytes * len(live) if known_size else 0
            row = state.record_instance(conn, sid, model, offered, live, origin=origin, loader=False,
                                        state=_resident_state(state.primary_instance(live).state),
                                        size_bytes=size)
            if row["inserted"]:
                result.added.append(model)
        gone = queries.all(conn, "cluster_delete_vanished_instances", {"server_id": sid, "models": list(found)})
        result.removed = [g["model"] for g in gone]
        queries.run(conn, "cluster_set_memory", {
            "server_id": sid, "memory_bytes": memory, "memory_source": source,
            "safety_bytes": _safety_bytes(memory, server_row["system_reserve_bytes"], server_row["safety_fraction"])})
    result.models = sorted(found)
    if result.added or result.removed:
        logger.info("server %s: +%s -%s", name, result.added, result.removed)
    return result


def set_dispatch_cap(database: db.Database, cap: int | None) -> bool:
    """Makes `queueSettings.maxConcurrentWorkers` the cluster-wide cap on generations in flight (None:
    no cap beyond the slots); the claim reads it at every call, so an edit applies at the next refresh."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"queueSettings.maxConcurrentWorkers must be an integer >= 1 or absent, got {cap!r}")
    with database.transaction() as conn:
        changed = queries.one(conn, "cluster_set_dispatch_cap", {"cap": cap})
    if changed is not None:
        logger.info("cluster-wide cap on generations in flight: %s", cap if cap is not None else "none (slots only)")
    return changed is not None


@dataclass(frozen=True)
class RefreshPass:
    """What one `refresh_all` did: every server's refresh and the slot changes that followed."""

    results: list[RefreshResult]
    deltas: list[slots.SlotDelta]

    @property
    def failed(self) -> list[RefreshResult]:
        return [r for r in self.results if not r.ok]

    @property
    def changed(self) -> list[RefreshResult]:
        return [r for r in self.results if r.added or r.removed]

    def __bool__(self) -> bool:
        """Whether anything worth reporting happened (a failure, a change of models or of slots)."""
        return bool(self.failed or self.changed or self.deltas)


def refresh_all(database: db.Database, backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server, *,
                sync: bool = True, config_path: str | None = None) -> RefreshPass:
    """Syncs servers from the config (when there is one), refreshes every enabled server that is not
    down or backed off (a down server is the probe's), then rebalances slots to match."""
    found = configured(config_path) if sync else None
    if found is not None:
        with database.transaction() as conn:
            sync_servers(conn, found.servers)
            retried = health.clear_config_refusals(conn, found.fingerprint)
        if retried:
            logger.info("the configuration changed; will try again: %s", ", ".join(sorted({m for _, m in retried})))
        if found.config is not None:
            set_dispatch_cap(database, found.config.queue_settings.max_concurrent_workers)
    with database.transaction() as conn:
        now = state.now(conn)
        servers = [s for s in state.servers(conn)
                   if s["enabled"] and s["health"] != "down"
                   and (s["backoff_until"] is None or s["backoff_until"] <= now)]
        wanted = {r["model"] for r in queries.all(conn, "cluster_wanted_models")}
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
        deltas = slots.rebalance(conn)
    return RefreshPass(results, deltas)
