"""What operators read and the few things they may do, as plain dicts.

The CLI, the HTTP server, /metrics and the dashboard all go through here (and so through the views
of `0005_inspection.sql`), so every surface shows the same numbers. Actions on jobs go through the SQL
functions `requeue_job`/`discard_job`, whose refusals (a running job belongs to its worker) become
`JobActionError` with the database's message.

Owns no table; reads the views and calls their functions. Other packages' state (resident models)
it reads through that package (`aibot.cluster.state`).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

from aibot import db

queries = db.Queries(__name__)

JOB_STATES = ("queued", "running", "done", "skipped", "dead", "rejected", "cancelled")
BANDS = ("critical", "high", "medium", "low", "background")


class InspectionError(Exception):
    """Base of the operator-facing errors; the message is safe to show as-is."""


class JobNotFound(InspectionError):
    pass


class JobActionError(InspectionError):
    """The database refused the action (e.g. the job is running)."""


class ServerNotFound(InspectionError):
    pass


def priority_band(priority: int) -> str:
    """Same bands as SQL `aibot.priority_band` (original monitor, §3.3)."""
    if priority <= 10:
        return "critical"
    if priority <= 30:
        return "high"
    if priority <= 60:
        return "medium"
    if priority <= 90:
        return "low"
    return "background"


def validate_state(state: str | None) -> str | None:
    if state is None or state == "":
        return None
    if state not in JOB_STATES:
        raise ValueError(f"state: {state!r} is not one of {', '.join(JOB_STATES)}")
    return state


def validate_limit(limit: Any, *, maximum: int = 10000) -> int:
    try:
        value = int(limit)
    except (TypeError, ValueError):
        raise ValueError(f"limit: {limit!r} is not a whole number") from None
    if not 1 <= value <= maximum:
        raise ValueError(f"limit: {value} is outside 1..{maximum}")
    return value


# --- reads -------------------------------------------------------------------------------------------

def queue_depth(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_queue_depth")


def queue_oldest(conn: psycopg.Connection) -> dict:
    return queries.one(conn, "ops_queue_oldest") or {}


def in_flight(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_in_flight")


def failed_jobs(conn: psycopg.Connection, limit: int = 20) -> list[dict]:
    return queries.all(conn, "ops_failed_jobs", {"limit": validate_limit(limit)})


def server_health(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_server_health")


def slot_usage(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_slot_usage")


def throughput(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_throughput")


def entity_counts(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_entity_counts")


def worker_status(conn: psycopg.Connection) -> list[dict]:
    return queries.all(conn, "ops_worker_status")


def status_snapshot(conn: psycopg.Connection, *, failed_limit: int = 10) -> dict[str, Any]:
    """Everything `aibot status` prints, read in one transaction so every part uses the same now()."""
    with conn.transaction():
        return {
            "queue_depth": queue_depth(conn),
            "oldest": queue_oldest(conn),
            "in_flight": in_flight(conn),
            "failed": failed_jobs(conn, failed_limit),
            "servers": server_health(conn),
            "slots": slot_usage(conn),
            "throughput": throughput(conn),
            "entities": entity_counts(conn),
            "workers": worker_status(conn),
            "unservable": unservable(conn),
        }


def list_jobs(conn: psycopg.Connection, *, state: str | None = None, entity: str | None = None,
              limit: int = 50) -> list[dict]:
    params = {"state": validate_state(state), "entity": entity or None, "limit": validate_limit(limit)}
    return queries.all(conn, "ops_jobs_list", params)


def get_job(conn: psycopg.Connection, job_id: int) -> dict:
    row = queries.one(conn, "ops_job_get", {"id": int(job_id)})
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return row


def queue_items(conn: psycopg.Connection, limit: int = 500) -> list[dict]:
    return _items(conn, None, validate_limit(limit))


def queue_items_by_ids(conn: psycopg.Connection, ids: list[int]) -> list[dict]:
    return _items(conn, [int(i) for i in ids], len(ids)) if ids else []


def _items(conn: psycopg.Connection, ids: list[int] | None, limit: int) -> list[dict]:
    """One query serves the live queue and the WebSocket frames for given ids; `rank` only orders it."""
    rows = queries.all(conn, "ops_queue_items", {"ids": ids, "limit": limit})
    for r in rows:
        r.pop("rank", None)
    return rows


def monitor_stats(conn: psycopg.Connection) -> dict[str, Any]:
    """The original monitor's `stats` object (counts, bands, waits in ms, throughput)."""
    row = dict(queries.one(conn, "ops_monitor_stats") or {})
    for key in ("totalItems", "unclaimedItems", "claimedItems", "averageWaitTime", "throughput",
                "oldestItemAge", "staleClaims", "avgWait"):
        row[key] = int(row.get(key) or 0)
    row["throughputHour"] = round(float(row.get("throughputHour") or 0.0), 3)
    row["priorityBands"] = {band: int((row.get("priorityBands") or {}).get(band, 0)) for band in BANDS}
    return row


def queue_size(conn: psycopg.Connection) -> int:
    return int(queries.one(conn, "ops_health")["queue_size"])


def job_durations(conn: psycopg.Connection, minutes: int) -> list[dict]:
    """Quantiles of run (claim to finish) and latency (message to reply) over the last `minutes`."""
    return queries.all(conn, "ops_job_durations", {"minutes": minutes})


def job_duration_totals(conn: psycopg.Connection, minutes: int) -> dict:
    """Sums and count behind `job_durations`, for the summaries' `_sum` and `_count`."""
    return queries.one(conn, "ops_job_durations_totals", {"minutes": minutes})


def model_loads(conn: psycopg.Connection) -> list[dict]:
    """Loads and unloads recorded in `model_loads`, per (server, model, action, outcome)."""
    return queries.all(conn, "ops_model_loads")


def resident_models(conn: psycopg.Connection) -> list[dict]:
    """Models resident on each server with their slots and requests in flight (`aibot models list`),
    as the cluster records them (`aibot.cluster.state`)."""
    from aibot.cluster import state

    names = {s["id"]: s["name"] for s in state.servers(conn)}
    counts = {(c["server_id"], c["model"]): c for c in state.slot_counts(conn)}
    rows = []
    for r in state.instances(conn):
        c = counts.get((r["server_id"], r["model"]), {})
        rows.append({**r, "server": names.get(r["server_id"]), "slots": c.get("free", 0) + c.get("held", 0)})
    return rows


def listen(conn: psycopg.Connection) -> None:
    """Subscribes this (autocommit) connection to the job and server change notifications."""
    queries.run(conn, "ops_listen")


def register_listener(conn: psycopg.Connection, listener: str, ttl_seconds: float) -> None:
    """Job events are sent while a registered listener has not expired (migration 0014): each costs the
    committing transaction the notification queue's lock, so nobody pays it while nobody watches."""
    queries.run(conn, "ops_events_register", {"listener": listener, "ttl": ttl_seconds})


def unregister_listener(conn: psycopg.Connection, listener: str) -> None:
    queries.run(conn, "ops_events_unregister", {"listener": listener})


def replies_per_minute(conn: psycopg.Connection, minutes: int = 60) -> list[dict]:
    return queries.all(conn, "ops_replies_per_minute", {"minutes": validate_limit(minutes, maximum=1440)})


def serving(row: dict) -> str:
    """Where a model's queued work will be served, in the operator's words: the servers that hold it,
    else where it is loading, else why no server can hold it (the loader's waiting note), else that
    the scheduler has not placed it yet."""
    if row.get("served_by"):
        return "served by " + ", ".join(row["served_by"])
    if row.get("loading_on"):
        return "loading on " + ", ".join(row["loading_on"])
    why = row.get("waiting_reason")
    if why:
        if why.startswith("no server can load "):
            why = why.split(": ", 1)[-1]   # the model is the row's; keep the per-server reasons
        return "no server can hold it: " + why
    return "not placed yet (the scheduler loads it on its next tick)" if row.get("queued") else "idle"


def model_queue(conn: psycopg.Connection) -> list[dict]:
    """Per model: queued jobs, the oldest one's wait, replicas, and where it will be served (`serving`)."""
    return [{**r, "serving": serving(r)} for r in queries.all(conn, "ops_model_queue")]


def unservable(conn: psycopg.Connection) -> list[dict]:
    """Models with queued work that no server holds or is loading, with why (`aibot status`)."""
    return [r for r in model_queue(conn) if r["queued"] and not r["served_by"] and not r["loading_on"]]


def entity_wait(conn: psycopg.Connection) -> list[dict]:
    """Per persona: queued now, oldest wait, p50/p95 wait (enqueue to claim) over the last hour."""
    return queries.all(conn, "ops_entity_wait")


def load_timeline(conn: psycopg.Connection, minutes: int = 60) -> list[dict]:
    """Loads, unloads (evictions) and failed loads per minute."""
    return queries.all(conn, "ops_load_timeline", {"minutes": validate_limit(minutes, maximum=1440)})


# --- actions -----------------------------------------------------------------------------------------

def _job_action(conn: psycopg.Connection, name: str, params: dict) -> dict:
    try:
        with conn.transaction():
            return dict(queries.one(conn, name, params))
    except errors.NoDataFound as exc:
        raise JobNotFound(exc.diag.message_primary or f"job {params['id']} does not exist") from None
    except errors.ObjectInUse as exc:
        raise JobActionError(exc.diag.message_primary or str(exc)) from None


def requeue_job(conn: psycopg.Connection, job_id: int) -> dict:
    """Back to queued with a fresh attempt budget (dead/cancelled/rejected/skipped jobs)."""
    return _job_action(conn, "ops_requeue_job", {"id": int(job_id)})


def discard_job(conn: psycopg.Connection, job_id: int, reason: str | None = None) -> dict:
    """Cancels a job that is not running and not finished."""
    return _job_action(conn, "ops_discard_job", {"id": int(job_id), "reason": reason})


def clear_queue(conn: psycopg.Connection, reason: str = "cleared by an operator") -> int:
    """Cancels every queued job; running jobs finish. Returns how many were cancelled."""
    with conn.transaction():
        return len(queries.all(conn, "ops_cancel_all_queued", {"reason": reason}))


def _server_update(conn: psycopg.Connection, name_query: str, name: str) -> dict:
    with conn.transaction():
        row = queries.one(conn, name_query, {"name": name})
    if row is None:
        known = [r["name"] for r in queries.all(conn, "ops_server_names")]
        raise ServerNotFound(f"server {name!r} is not known (servers: {', '.join(known) or 'none'})")
    return row


def drain_server(conn: psycopg.Connection, name: str) -> dict:
    """Claims stop taking the server's slots; jobs in flight there finish normally."""
    return _server_update(conn, "ops_server_drain", name)


def enable_server(conn: psycopg.Connection, name: str) -> dict:
    return _server_update(conn, "ops_server_enable", name)
