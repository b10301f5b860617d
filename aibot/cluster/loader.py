"""Single-flight model loading and unloading, cluster-wide.

Twenty workers that all find their model missing must cause one load, not twenty (the seed's
"multiple try to load same model"): a loader takes a Postgres session advisory lock keyed on
(server id, hashtext(model)) on its own connection and holds it for the whole HTTP load. Everyone
else waits on that lock (bounded by lock_timeout) and then finds the model loaded.

The memory budget holds while loading: the decision runs in a short transaction that locks the
server row (so two loads of different models on one server cannot both pass the check), re-checks
room with `aibot.cluster.placement`, takes the slots of idle models to evict, and inserts the new instance
in state 'loading' so its memory counts before a single byte is loaded. No transaction is open
during HTTP; other models keep serving meanwhile.

Owns the load/unload transitions of `model_instances` and the `model_loads` history; the placement
decision is `aibot.cluster.placement`'s and the slot rows are `aibot.cluster.slots`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors

from aibot import db
from aibot.backends import identity
from aibot.backends.base import (
    Backend,
    BackendError,
    InsufficientResources,
    LoadedModel,
    LoadFailed,
    ModelUnavailable,
    Offered,
)
from aibot.backends.factory import backend_for_server
from aibot.cluster import demand, health, placement, slots, state
from aibot.cluster.configured import configured
from aibot.cluster.sizing import GB
from aibot.queue import jobs
from aibot.settings import get_settings

logger = logging.getLogger(__name__)
queries = db.Queries(__name__)

DEFAULT_MODEL_BYTES = 15 * GB        # the seed's typical f16 model, when a model's size was never seen
DEFAULT_WAIT_SECONDS = 600.0         # cold loads of big models take minutes
_MAX_PLACEMENT_TRIES = 5

Progress = Callable[..., None]


# A loader whose database session died may still have its HTTP load running at the server; the next
# loader watches the server for `Settings.orphan_load_grace_seconds` (from the orphaned load's start)
# before loading again.
ORPHAN_POLL_SECONDS = 0.25
MAX_PARALLEL_LOADS = 4   # model loads one scheduler tick or worker starts at once


class LoadError(RuntimeError):
    """A model could not be (un)loaded; the message says where and why."""


class NoRoom(LoadError):
    """No eligible server has room, even after evicting idle models."""


class LoadTimeout(LoadError):
    """Another loader held the (server, model) lock longer than we were willing to wait."""


class ModelBusy(LoadError):
    """An unload was refused because requests are in flight on the model."""


class _Retry(Exception):
    """The placement decision no longer holds under the server lock; roll back and decide again."""


@dataclass(frozen=True)
class LoadResult:
    server_id: int
    server: str
    model: str
    loaded_now: bool                 # this call performed the load (False: it was already there)
    evicted: tuple[str, ...] = ()
    seconds: float = 0.0


def _noop(event: str, **info: Any) -> None:
    pass


def _lock_connection(database) -> psycopg.Connection:
    """A dedicated autocommit connection: session advisory locks must outlive any transaction."""
    url = database if isinstance(database, str) else database.url
    return db.connect(url, autocommit=True)


def try_lock_model(conn: psycopg.Connection, server_id: int, model: str) -> bool:
    """Takes the (server, model) single-flight lock on this session if nobody holds it."""
    return queries.one(conn, "cluster_try_lock_model", {"server_id": server_id, "model": model})["locked"]


def unlock_model(conn: psycopg.Connection, server_id: int, model: str) -> None:
    queries.run(conn, "cluster_unlock_model", {"server_id": server_id, "model": model})


def _acquire(conn: psycopg.Connection, server_id: int, model: str, deadline: float) -> None:
    """Takes the (server, model) lock, waiting at most until `deadline` for its holder."""
    if try_lock_model(conn, server_id, model):
        return
    remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
        queries.run(conn, "cluster_set_lock_timeout", {"ms": str(remaining_ms)})
        queries.run(conn, "cluster_wait_lock_model", {"server_id": server_id, "model": model})
    except errors.LockNotAvailable:
        raise LoadTimeout(f"gave up after waiting for the lock on {model!r} at server id {server_id}") from None
    finally:
        queries.run(conn, "cluster_reset_lock_timeout")


def _wait_for_loader(conn: psycopg.Connection, server_id: int, model: str, deadline: float,
                     backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server) -> None:
    """Blocks until whoever holds (server, model) is done; cleans up after a loader that died."""
    _acquire(conn, server_id, model, deadline)
    try:
        # We hold the lock now: a row still 'loading' belongs to a loader that went away. Its HTTP load
        # may still be running at the server (only its database session died), so give the server the
        # chance to finish it before concluding it failed; loading again would load a duplicate.
        stale = [r for r in state.residency(conn, model)
                 if r["server_id"] == server_id and r["state"] == "loading"]
        if stale and _adopt_orphan_load(conn, server_id, model, backend_for, deadline):
            return
        with conn.transaction():
            for r in state.residency(conn, model):
                if r["server_id"] != server_id or r["state"] not in ("loading", "unloading"):
                    continue
                if r["state"] == "loading":
                    queries.run(conn, "cluster_delete_instance", {"server_id": server_id, "model": model})
                else:   # an unload that never finished: resident until a refresh says otherwise
                    queries.run(conn, "cluster_set_instance_state", {"server_id": server_id, "model": model,
                                                                "state": "loaded"})
                queries.run(conn, "cluster_load_abandon", {"server_id": server_id, "model": model})
                logger.warning("cleaned up after a dead loader: %s on server id %d was %r",
                               model, server_id, r["state"])
    finally:
        unlock_model(conn, server_id, model)


def _adopt_orphan_load(conn: psycopg.Connection, server_id: int, model: str, backend_for, deadline: float) -> bool:
    """Watches the server for up to `orphan_load_grace_seconds` (AIBOT_ORPHAN_LOAD_GRACE_SECONDS) after
    the orphaned load began; if the model
    shows up, records it as loaded (and the orphaned history row as done) and returns True."""
    row = queries.one(conn, "cluster_orphan_load", {"server_id": server_id, "model": model})
    if row is None:
        return False
    grace = get_settings().orphan_load_grace_seconds
    until = min(deadline, time.monotonic() + max(0.0, grace - float(row["age_seconds"])))
    backend = backend_for(row)
    try:
        while True:
            try:
                offered = identity.identify(backend, model, identity.catalogue_of(backend))
            except BackendError as exc:
                logger.warning("cannot list %s while waiting for an orphaned load of %s: %s", row["name"], model, exc)
                offered = None
            live = state.live_instances(offered) if offered is not None else []
            if live and any(i.state != "loading" for i in live):
                with conn.transaction():
                    _record_resident(conn, server_id, model, offered, live, origin="aibot")
                    queries.run(conn, "cluster_orphan_load_done", {"server_id": server_id, "model": model})
                    slots.rebalance(conn, server_id=server_id)
                logger.info("adopted %s on %s: a loader went away but the server finished its load", model, row["name"])
                return True
            if time.monotonic() >= until:
                return False
            time.sleep(ORPHAN_POLL_SECONDS)
    finally:
        backend.close()


@dataclass(frozen=True)
class ModelSize:
    bytes: int
    source: str          # where the figure came from, shown in every "not enough memory" message
    assumed: bool = False


_assumed_logged: set[str] = set()


def known_size(conn: psycopg.Connection, model: str, config: Any = None) -> ModelSize | None:
    """A model's size if anyone knows it: a server's report (model_catalog), else the configuration's
    `models["<id>"].sizeGB` (`config`, else the process's); None when only an assumption is left."""
    known = state.catalog_size(conn, model)
    if known:
        return ModelSize(int(known["size_bytes"]), f"reported by {known['size_source'] or 'a server'}")
    if config is None:
        found = configured()
        config = found.config if found is not None else None
    settings = config.model_settings(model) if config is not None else None
    if settings is not None and settings.size_bytes:
        return ModelSize(settings.size_bytes, f'config models["{model}"].sizeGB')
    return None


def model_size(conn: psycopg.Connection, model: str, size_bytes: int | None = None) -> ModelSize:
    """A model's size for placement: the caller's figure, else what a server reported (model_catalog),
    else the configuration's `models["<id>"].sizeGB`, else an explicit assumption of 15 GB that is
    logged (once per model and process) and named in every refusal that rests on it."""
    if size_bytes:
        return ModelSize(int(size_bytes), "given by the caller")
    known = known_size(conn, model)
    if known is not None:
        return known
    source = (f'assumed: no server reported its size and the config has no models["{model}"].sizeGB')
    if model not in _assumed_logged:
        _assumed_logged.add(model)
        logger.warning("model %s: size unknown, assuming %s for placement (set models[\"%s\"].sizeGB in the "
                       "config if that is wrong)", model, f"{DEFAULT_MODEL_BYTES / GB:.0f} GB", model)
    return ModelSize(DEFAULT_MODEL_BYTES, source, assumed=True)


def _record_resident(conn: psycopg.Connection, sid: int, model: str, offered: Offered, live: list[LoadedModel],
                     *, origin: str) -> None:
    """Records `model`'s instances on server `sid` as resident (under the configured name)."""
    state.record_instance(conn, sid, model, offered, live, state="loaded", origin=origin, loader=True)


def ensure_loaded(database, model: str, *, server: str | None = None,
                  backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server,
                  worker_id: str | None = None, size_bytes: int | None = None,
                  min_residency_s: float = placement.DEFAULT_MIN_RESIDENCY_SECONDS,
                  wait_s: float = DEFAULT_WAIT_SECONDS, progress: Progress = _noop,
                  plan: placement.Placement | None = None) -> LoadResult:
    """Makes sure `model` is loaded on a usable server (or on `server`), loading it at most once.

    `plan` (a demand pass's decision: `aibot.cluster.demand`) names the server and the victims that
    may leave for it; the room is re-checked under the server's lock with exactly those victims.

    `database` is an `aibot.db.Database` or a URL; the call uses one dedicated connection of its own.
    Size for placement: see `model_size`. A server that refuses the model for good (an unknown name,
    LM Studio's model_not_found) is marked so and the next server is tried; one whose load failed is
    backed off for that model. Raises NoRoom, LoadTimeout or LoadError.
    """
    started = time.monotonic()
    deadline = started + wait_s
    with _lock_connection(database) as conn:
        for _ in range(_MAX_PLACEMENT_TRIES * 4):
            where = [r for r in state.residency(conn, model)
                     if server is None or r["name"] == server]
            ready = [r for r in where if r["state"] == "loaded" and r["usable"]]
            if ready:
                progress("ready", server=ready[0]["name"], model=model)
                return LoadResult(ready[0]["server_id"], ready[0]["name"], model, False,
                                  seconds=time.monotonic() - started)
            pending = [r for r in where if r["state"] in ("loading", "unloading")]
            if pending:
                progress("waiting", server=pending[0]["name"], model=model, state=pending[0]["state"])
                _wait_for_loader(conn, pending[0]["server_id"], model, deadline, backend_for)
                continue
            try:
                choice = plan if plan is not None else _choose(conn, model, server, size_bytes, min_residency_s)
            except _Retry:
                continue
            if not try_lock_model(conn, choice.server_id, model):
                progress("waiting", server=choice.name, model=model, state="locked")
                _wait_for_loader(conn, choice.server_id, model, deadline, backend_for)
                continue
            try:
                result = _load_locked(conn, choice, model, size_bytes=model_size(conn, model, size_bytes).bytes,
                                      backend_for=backend_for, worker_id=worker_id,
                                      min_residency_s=min_residency_s, progress=progress, deadline=deadline,
                                      replica_ok=server is not None,
                                      candidates=None if plan is None else plan.evict)
            finally:
                unlock_model(conn, choice.server_id, model)
            if result is not None:
                return LoadResult(result.server_id, result.server, model, result.loaded_now, result.evicted,
                                  time.monotonic() - started)
            # The server changed under us (room gone, or a victim got busy): decide again.
        raise LoadError(f"could not place {model!r}: the cluster kept changing under the loader")


def _choose(conn: psycopg.Connection, model: str, server: str | None, size_bytes: int | None,
            min_residency_s: float) -> placement.Placement:
    now = state.now(conn)
    views = state.server_views(conn)
    if server is not None:
        views = [v for v in views if v.name == server]
        if not views:
            raise LoadError(f"unknown server {server!r}")
    demand = state.queued_demand(conn)
    size = model_size(conn, model, size_bytes)
    choice = placement.choose_server(views, model, size.bytes, now=now, min_residency_s=min_residency_s,
                                     demand=demand, size_source=size.source)
    if isinstance(choice, placement.Refusal):
        # Someone started (or finished) this very model since we looked: go back and wait for it.
        if any((r := v.holds(model)) is not None and (r.state != "loaded" or v.can_load) for v in views):
            raise _Retry
        raise NoRoom(f"no server can load {model!r}: {choice}")
    return choice


def _load_locked(conn: psycopg.Connection, choice: placement.Placement, model: str, *, size_bytes: int,
                 backend_for, worker_id, min_residency_s, progress: Progress, deadline: float,
                 replica_ok: bool = False, candidates: tuple[str, ...] | None = None) -> LoadResult | None:
    """Runs with the (server, model) lock held. Returns None when the decision must be made again.

    Victims are locked too (same single-flight key), so nobody mistakes their 'unloading' rows for
    debris of a dead loader, and nobody loads or unloads them concurrently.
    """
    victim_locks: list[str] = []
    try:
        return _load_locked_inner(conn, choice, model, size_bytes, backend_for, worker_id, min_residency_s,
                                  progress, deadline, victim_locks, replica_ok, candidates)
    finally:
        for victim in victim_locks:
            unlock_model(conn, choice.server_id, victim)


def _decide(conn, sid, model, size_bytes, worker_id, min_residency_s, victim_locks, replica_ok=False,
            candidates=None):
    """Step 1, in one transaction under the server row lock: re-check room, take the victims' slots,
    reserve the memory ('loading' row). `_Retry` rolls it all back.

    Placement decisions for one model are serialised cluster-wide (a transaction lock on the model):
    otherwise two loaders that looked at the cluster at the same moment could each pick a different
    server (the per-(server, model) lock does not stop that) and load two replicas for one demand.
    An operator asking for a specific server (`replica_ok`) may add a replica on purpose.
    """
    with conn.transaction():
        queries.run(conn, "cluster_lock_model_placement", {"model": model})
        if not replica_ok and any(
                r["server_id"] != sid and r["usable"] and r["state"] in ("loaded", "loading")
                for r in state.residency(conn, model)):
            raise _Retry  # placed elsewhere since we looked: go back, wait for it or use it
        srow = queries.one(conn, "cluster_server_lock", {"server_id": sid})
        # Freeze the server's slots: claims skip locked rows, so the requests in flight that the room
        # check counts cannot grow under it, and free slots the new model's memory no longer covers
        # are deleted below before any claim can take them.
        state.lock_server_slots(conn, sid)
        now = state.now(conn)
        view = next(v for v in state.server_views(conn) if v.server_id == sid)
        mine = view.holds(model)
        if mine is not None and mine.state == "loaded":
            return srow, None, None
        if mine is not None:   # a stale row: we hold the lock, so nobody else is loading it
            view = dataclasses.replace(view, residents=tuple(r for r in view.residents if r.model != model))
        if not view.can_load:
            raise _Retry
        evict = placement.room_for(view, size_bytes, now=now, min_residency_s=min_residency_s,
                                   demand=state.queued_demand(conn), candidates=candidates)
        if evict is None:
            raise _Retry
        victims = []
        for victim in evict:
            if not try_lock_model(conn, sid, victim):
                raise _Retry   # someone is unloading/reloading it right now
            victim_locks.append(victim)
            rows = queries.all(conn, "cluster_lock_pair_slots", {"server_id": sid, "model": victim})
            if any(r["job_id"] is not None for r in rows):
                raise _Retry   # got busy since the snapshot
            queries.run(conn, "cluster_delete_pair_free_slots", {"server_id": sid, "model": victim})
            if queries.one(conn, "cluster_mark_unloading", {"server_id": sid, "model": victim}) is None:
                raise _Retry
            vid = queries.one(conn, "cluster_load_start", {"server_id": sid, "model": victim, "action": "unload",
                                                      "reason": f"evicted for {model}", "worker_id": worker_id})["id"]
            victims.append((victim, vid))
        if queries.one(conn, "cluster_mark_loading", {"server_id": sid, "model": model, "size_bytes": size_bytes,
                                                 "parallel": 1}) is None:
            return srow, None, None   # a refresh saw it loaded meanwhile
        load_id = queries.one(conn, "cluster_load_start", {"server_id": sid, "model": model, "action": "load",
                                                      "reason": None, "worker_id": worker_id})["id"]
        # The loading model's memory counts from now: shrink the slots to what is left, in this
        # transaction, so accounted memory (models + every slot's buffer) never exceeds the budget.
        slots.rebalance(conn, server_id=sid)
    return srow, victims, load_id


def _load_locked_inner(conn, choice, model, size_bytes, backend_for, worker_id, min_residency_s,
                       progress: Progress, deadline, victim_locks, replica_ok=False,
                       candidates=None) -> LoadResult | None:
    sid = choice.server_id
    srow = state.server_by_id(conn, sid)
    backend = backend_for(srow)
    try:
        # 1. What the server calls this model (HTTP, no transaction open). A name it will never serve
        #    is refused for this server until its model list or the configuration changes; a model it
        #    already holds (its own autoload, or a load we lost track of) is adopted, never loaded twice.
        try:
            offered = identity.locate(backend, model, identity.catalogue_of(backend), f"server {srow['name']}")
        except ModelUnavailable as exc:
            _refuse(conn, sid, model, exc)
            return None
        except BackendError as exc:
            _fault(conn, sid, model, f"listing before loading {model}", exc)
            raise LoadError(f"cannot list {srow['name']} to load {model!r}: {type(exc).__name__}: {exc}") from exc
        live = state.live_instances(offered)
        if live:
            with conn.transaction():
                _record_resident(conn, sid, model, offered, live, origin="server")
            slots.rebalance(conn, server_id=sid)
            logger.info("%s is already on %s (as %s): adopted", model, srow["name"], live[0].key)
            return LoadResult(sid, srow["name"], model, False)
        size_bytes = offered.size_bytes or size_bytes
        try:
            srow, victims, load_id = _decide(conn, sid, model, size_bytes, worker_id, min_residency_s, victim_locks,
                                             replica_ok, candidates)
        except _Retry:
            return None
        if victims is None:
            return LoadResult(sid, srow["name"], model, False)
        instance_ids = {r["model"]: r["instance_id"] or r["model"]
                        for r in state.recorded_models(conn, sid)}

        # 2. Evict (HTTP, no transaction open).
        for victim, vid in victims:
            progress("evicting", server=srow["name"], model=victim)
            try:
                backend.unload(instance_ids.get(victim, victim))
            except BackendError as exc:
                with conn.transaction():
                    for v, i in victims:
                        queries.run(conn, "cluster_set_instance_state", {"server_id": sid, "model": v, "state": "loaded"})
                        queries.run(conn, "cluster_load_finish", {"id": i, "ok": False, "error": str(exc)[:500]})
                _abort_load(conn, sid, model, load_id, f"eviction of {victim} failed: {exc}")
                raise LoadError(f"could not evict {victim!r} from {srow['name']} to make room for {model!r}: "
                                f"{exc}") from exc
            with conn.transaction():
                queries.run(conn, "cluster_delete_instance", {"server_id": sid, "model": victim})
                queries.run(conn, "cluster_load_finish", {"id": vid, "ok": True, "error": None})
            logger.info("evicted %s from %s to make room for %s", victim, srow["name"], model)

        # 3. Load by the name the server accepts, holding the lock throughout.
        progress("loading", server=srow["name"], model=model, size_bytes=size_bytes)
        t0 = time.monotonic()
        try:
            loaded = backend.load(offered.key)
            loaded = _await_loaded(backend, model, loaded, deadline)
        except BackendError as exc:
            _abort_load(conn, sid, model, load_id, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, ModelUnavailable):
                _refuse(conn, sid, model, exc)
            else:
                _fault(conn, sid, model, f"load {model}", exc)
            raise LoadError(f"loading {model!r} on {srow['name']} failed: {type(exc).__name__}: {exc}") from exc

        # 4. Loaded: record, then give it slots.
        size = loaded.size_bytes or size_bytes
        with conn.transaction():
            queries.run(conn, "cluster_mark_loaded", {"server_id": sid, "model": model, "size_bytes": size,
                                                 "parallel": max(1, loaded.parallel or 1),
                                                 "context_length": loaded.context_length,
                                                 "instance_id": loaded.key, "ttl_seconds": loaded.ttl_seconds})
            if loaded.size_bytes:
                state.remember_size(conn, model, loaded.size_bytes, parallel=loaded.parallel,
                                    context_length=loaded.context_length, source=f"server {srow['name']}")
            queries.run(conn, "cluster_load_finish", {"id": load_id, "ok": True, "error": None})
            health.record_model_ok(conn, sid, model)
        slots.rebalance(conn, server_id=sid)
        seconds = time.monotonic() - t0
        logger.info("loaded %s on %s as %s in %.1fs (parallel %d)", model, srow["name"], loaded.key, seconds,
                    loaded.parallel or 1)
        progress("loaded", server=srow["name"], model=model, seconds=seconds, parallel=loaded.parallel,
                 size_bytes=size)
        return LoadResult(sid, srow["name"], model, True, tuple(v for v, _ in victims))
    finally:
        backend.close()


def _refuse(conn: psycopg.Connection, sid: int, model: str, exc: BackendError) -> None:
    """The server will not serve this model as configured: mark the pair, so neither the loader nor a
    claim tries it again until the server's model list or the configuration changes."""
    found = configured()
    with conn.transaction():
        new = health.mark_unavailable(conn, sid, model, str(exc), found.fingerprint if found else None)
    if new:
        logger.warning("server id %d will not serve %s: %s", sid, model, exc)


def _fault(conn: psycopg.Connection, sid: int, model: str, what: str, exc: BackendError) -> None:
    """Blames the right scope: the server for connection-level faults, the (server, model) pair for a
    failed load (backed off at once: the server said so itself), nobody for a refusal for lack of memory
    (the placement was wrong, not the server)."""
    with conn.transaction():
        if isinstance(exc, InsufficientResources):
            health.record_model_fault(conn, sid, model, f"{what}: {type(exc).__name__}: {exc}", threshold=1)
        elif exc.scope == "server":
            health.record_fault(conn, sid, f"{what}: {type(exc).__name__}: {exc}")
        else:
            health.record_model_fault(conn, sid, model, f"{what}: {type(exc).__name__}: {exc}", threshold=1)


def _await_loaded(backend: Backend, model: str, loaded: LoadedModel, deadline: float) -> LoadedModel:
    """Some servers answer the load request before the model is ready: poll their catalogue until it is,
    or until the server says the load failed (then LoadFailed with its reason, at once)."""
    interval = 0.1
    while loaded.state == "loading":
        if time.monotonic() > deadline:
            raise LoadError(f"{model!r} was still loading at the deadline")
        time.sleep(interval)   # waiting on a remote process: there is no event to wait on
        interval = min(interval * 2, 1.0)
        offered = identity.identify(backend, model, identity.catalogue_of(backend))
        if offered is None:
            continue
        if offered.status == "failed":
            raise LoadFailed(f"the server failed to load {model!r}: {offered.failure or 'no reason given'}")
        found = [i for i in offered.instances if i.key == loaded.key] or state.live_instances(offered)
        if found:
            loaded = found[0]
    return loaded


def _abort_load(conn: psycopg.Connection, sid: int, model: str, load_id: int, error: str) -> None:
    with conn.transaction():
        queries.run(conn, "cluster_delete_instance", {"server_id": sid, "model": model})
        queries.run(conn, "cluster_load_finish", {"id": load_id, "ok": False, "error": error[:500]})
    slots.rebalance(conn, server_id=sid)


def unload(database, server: str, model: str, *,
           backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server,
           worker_id: str | None = None, force: bool = False, wait_s: float = 60.0,
           progress: Progress = _noop) -> bool:
    """Unloads `model` from `server` under the same single-flight lock as loads.

    Refuses (ModelBusy) while requests are in flight unless `force`, which retires their slots and
    unloads anyway (their generations will fail and be retried elsewhere). Returns False if the model
    was not resident.
    """
    deadline = time.monotonic() + wait_s
    with _lock_connection(database) as conn:
        srow = state.server_by_name(conn, server)
        if srow is None:
            raise LoadError(f"unknown server {server!r}")
        sid = srow["id"]
        _acquire(conn, sid, model, deadline)
        try:
            with conn.transaction():
                held = [r for r in queries.all(conn, "cluster_lock_pair_slots", {"server_id": sid, "model": model})
                        if r["job_id"] is not None]
                if held and not force:
                    raise ModelBusy(f"{model!r} on {server} has {len(held)} request(s) in flight; "
                                    f"wait, drain the server, or force")
                row = queries.one(conn, "cluster_mark_unloading", {"server_id": sid, "model": model})
                if row is None:
                    return False
                queries.run(conn, "cluster_delete_pair_free_slots", {"server_id": sid, "model": model})
                queries.run(conn, "cluster_retire_pair_slots", {"server_id": sid, "model": model})
                load_id = queries.one(conn, "cluster_load_start", {"server_id": sid, "model": model, "action": "unload",
                                                              "reason": "forced" if held else "requested",
                                                              "worker_id": worker_id})["id"]
            progress("unloading", server=server, model=model)
            backend = backend_for(srow)
            try:
                backend.unload(row.get("instance_id") or model)
            except BackendError as exc:
                with conn.transaction():
                    queries.run(conn, "cluster_set_instance_state", {"server_id": sid, "model": model, "state": "loaded"})
                    queries.run(conn, "cluster_load_finish", {"id": load_id, "ok": False, "error": str(exc)[:500]})
                slots.rebalance(conn, server_id=sid)
                raise LoadError(f"unloading {model!r} from {server} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                backend.close()
            with conn.transaction():
                queries.run(conn, "cluster_delete_instance", {"server_id": sid, "model": model})
                queries.run(conn, "cluster_load_finish", {"id": load_id, "ok": True, "error": None})
            slots.rebalance(conn, server_id=sid)
            progress("unloaded", server=server, model=model)
            logger.info("unloaded %s from %s", model, server)
            return True
        finally:
            unlock_model(conn, sid, model)


# ------------------------------------------------------------------------------------- queued demand

_not_loadable: dict[str, str] = {}   # model -> the last reason logged, so a refusal is logged once


@dataclass(frozen=True)
class DemandPass:
    """What one pass over queued demand did: slot changes, models loaded (`model@server`) and models
    that could not be loaded (`model (why)`)."""

    deltas: list[slots.SlotDelta]
    loaded: list[str]
    failed: list[str]

    def __bool__(self) -> bool:
        return bool(self.deltas or self.loaded or self.failed)


def demand_policy() -> demand.Policy:
    """The demand decisions' knobs: the queue's aging step (`AIBOT_AGING_SECONDS`) and the config's
    clusterSettings and per-model idle TTLs, re-read at every pass (the config hot-reloads)."""
    aging = get_settings().aging_seconds
    found = configured()
    cfg = found.config if found is not None else None
    if cfg is None:
        return demand.Policy(aging_s=aging)
    cs = cfg.cluster_settings
    return demand.Policy(
        aging_s=aging, residency_cap_s=cs.min_residency_seconds, residency_floor_s=cs.min_residency_floor_seconds,
        residency_per_load_s=cs.residency_per_load_second, replica_queue_factor=cs.replica_queue_factor,
        max_replicas=cs.max_replicas, keep_loaded=cs.keep_models_loaded, idle_ttl_s=cs.model_unload_delay_ms / 1000,
        model_ttl_s={m: s.idle_ttl_seconds for m, s in cfg.models.items() if s.idle_ttl_seconds is not None})


def plan_demand(conn: psycopg.Connection, policy: demand.Policy, *, replicas: bool, unloads: bool) -> demand.PassPlan:
    """Reads one snapshot of the cluster and the queue and decides the pass (`demand.plan_pass`)."""
    now = state.now(conn)
    views = state.server_views(conn)
    wanted = state.model_demand(conn)
    unplaced = [w["model"] for w in state.unplaced_demand(conn)]
    per_model: dict[str, int] = {}
    for c in state.slot_counts(conn):
        per_model[c["model"]] = per_model.get(c["model"], 0) + c["free"] + c["held"]
    sizes = {m: model_size(conn, m).bytes for m in unplaced}
    return demand.plan_pass(views, wanted, unplaced=unplaced, sizes=sizes, slots_by_model=per_model, now=now,
                            policy=policy, replicas=replicas, unloads=unloads)


def load_for_demand(database: db.Database, *, worker_id: str,
                    backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server,
                    replicas: bool = False, unloads: bool = False,
                    policy: demand.Policy | None = None) -> tuple[list[str], list[str]]:
    """Loads what queued work needs, as one demand pass decides from one snapshot (`plan_demand`).

    Models resident nowhere get a server (a swap when memory is short, under the starvation bound);
    with `replicas`, hot models get a replica; with `unloads`, idle and surplus models leave. Victims
    of a starving model's swap that still have requests in flight are drained (no new claims) and
    evicted on a later pass. Loads go in parallel; the loader stays single-flight per model cluster-wide
    and re-checks memory under each server's row lock, so parallel loads can neither duplicate a model
    nor overcommit a server. Returns the models loaded (`model@server`) and those that could not be
    (`model (why)`); each waiting job carries the reason (`aibot.queue.jobs.note_waiting`). Replicas
    and unloads are the scheduler's (one tick cluster-wide), swaps anyone's.
    """
    policy = policy or demand_policy()
    with database.transaction() as conn:
        plan = plan_demand(conn, policy, replicas=replicas, unloads=unloads)
        changed = queries.all(conn, "cluster_set_drains", {
            "keys": [f"{sid}/{m}" for sid, m in plan.drains]})
        if changed:
            slots.rebalance(conn)
            for r in changed:
                logger.info("%s %s on server id %d: %s", "draining" if r["draining"] else "no longer draining",
                            r["model"], r["server_id"], plan.waiting.get(r["model"], "a starving model needs the room")
                            if r["draining"] else "its room is no longer needed")
        for model, why in plan.waiting.items():
            jobs.note_waiting(conn, model, why)
            if _not_loadable.get(model) != why:
                _not_loadable[model] = why
                logger.info("model %s waits: %s", model, why)

    def load(item):
        model, server_id, server, evict, what = item
        # A replica is a second server on purpose; a swap is not: if another pass placed the model
        # meanwhile, the loader finds it there (or waits for it) instead of loading a second copy.
        replica = what.startswith("replica")
        try:
            res = ensure_loaded(database, model, server=server if replica else None, backend_for=backend_for,
                                worker_id=worker_id, plan=placement.Placement(server_id, server, tuple(evict)))
            _not_loadable.pop(model, None)
            with database.transaction() as conn:
                jobs.clear_waiting(conn, model)
            if res.loaded_now:
                logger.info("loaded %s on %s (%s%s)", model, res.server, what,
                            f", evicted {', '.join(res.evicted)}" if res.evicted else "")
            return f"{model}@{res.server}", None
        except LoadError as exc:
            reason = str(exc)
            with database.transaction() as conn:
                jobs.note_waiting(conn, model, reason)
            if _not_loadable.get(model) != reason:   # once per new reason, not at every pass
                _not_loadable[model] = reason
                logger.warning("cannot load %s on %s: %s", model, server, exc)
            return None, f"{model} ({exc})"

    items = [(s.model, s.server_id, s.server, s.evict, "starving: won a swap" if s.starved and s.evict
              else "swap" if s.evict else "placement") for s in plan.swaps]
    items += [(r.model, r.server_id, r.server, (), f"replica: expected first token {r.ettft_s:.1f} s there "
               f"against {r.wait_now_s:.1f} s queued") for r in plan.replicas]
    loaded, failed = [], []
    if items:
        with ThreadPoolExecutor(max_workers=min(len(items), MAX_PARALLEL_LOADS), thread_name_prefix="aibot-load") as pool:
            for ok, err in pool.map(load, items):
                (loaded if ok else failed).append(ok or err)
    for u in plan.unloads:
        try:
            if unload(database, u.server, u.model, worker_id=worker_id, backend_for=backend_for, wait_s=5.0):
                logger.info("unloaded %s from %s: %s", u.model, u.server, u.reason)
                loaded.append(f"-{u.model}@{u.server}")
        except LoadError as exc:   # got busy since the snapshot, or the server refused: next pass decides again
            logger.info("did not unload %s from %s (%s): %s", u.model, u.server, u.reason, exc)
    for model, why in plan.waiting.items():
        failed.append(f"{model} ({why})")
    return loaded, failed


def reap_orphan_loads(database: db.Database,
                      backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server) -> int:
    """Settles 'loading' rows whose loader died, without waiting for someone to want that pair again.

    Such a row counts as the model being on its way (the demand pass sends its work nowhere else), so
    left alone it would hold that work until a loader happened to ask for the same (server, model).
    Here each orphan (its single-flight lock free) is looked at once: adopted if the server finished the
    load, cleaned up as a dead load once older than the orphan grace, else left for the next tick —
    the same rules as `_wait_for_loader`, which does the work. Returns how many were settled.
    """
    settled = 0
    with database.transaction() as conn:
        rows = queries.all(conn, "cluster_loading_instances")
    if not rows:
        return 0
    grace = get_settings().orphan_load_grace_seconds
    with _lock_connection(database) as conn:
        for r in rows:
            if not try_lock_model(conn, r["server_id"], r["model"]):
                continue        # a live loader is at work
            unlock_model(conn, r["server_id"], r["model"])
            old = float(r["age_seconds"]) >= grace
            if old:
                _wait_for_loader(conn, r["server_id"], r["model"], time.monotonic() + 5.0, backend_for)
                settled += 1
            elif _adopt_orphan_load(conn, r["server_id"], r["model"], backend_for, time.monotonic()):
                settled += 1
    return settled


def rebalance_and_load(database: db.Database,
                       backend_for: Callable[[Mapping[str, Any]], Backend] = backend_for_server) -> DemandPass:
    """Settles loads whose loader died, resizes slots, then loads models that queued work needs and no
    usable server holds."""
    reap_orphan_loads(database, backend_for)
    with database.transaction() as conn:
        deltas = slots.rebalance(conn)
    loaded, failed = load_for_demand(database, worker_id="scheduler", backend_for=backend_for,
                                     replicas=True, unloads=True)
    return DemandPass(deltas, loaded, failed)
