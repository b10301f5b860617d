"""`aibot status` (one snapshot of the queue, cluster and throughput) and `aibot top` (the same, live)."""

from __future__ import annotations

import argparse
import datetime as dt

from rich.console import Group
from rich.text import Text

from aibot import db
from aibot.cli.render import Column, fmt_bytes, fmt_seconds, live_loop, print_, table
from aibot.ops import inspection
from aibot.settings import redact_url


def register(sub) -> None:
    p = sub.add_parser("status", help="queue depth, in-flight jobs, servers, slots, throughput, dead jobs")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    p.add_argument("--failed", type=_positive_int, default=10, metavar="N", help="dead/rejected jobs to list (10)")
    p.set_defaults(func=run_status)

    t = sub.add_parser("top", help="aibot status, refreshed every few seconds")
    t.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    t.add_argument("--interval", type=_non_negative_float, default=2.0, metavar="SECONDS", help="refresh period (2)")
    t.add_argument("--iterations", type=_positive_int, default=None, metavar="N", help="stop after N refreshes")
    t.add_argument("--failed", type=_positive_int, default=5, metavar="N", help="dead/rejected jobs to list (5)")
    t.set_defaults(func=run_top)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _secs(v):
    return fmt_seconds(v)


def render_status(snap: dict, database_url: str, now: dt.datetime | None = None) -> Group:
    """The status report. Pure: the caller reads the snapshot; the URL is shown redacted."""
    now = now or dt.datetime.now().astimezone()
    out = [Text(f"aibot status  {now.strftime('%Y-%m-%d %H:%M:%S')}  database {redact_url(database_url)}",
                style="bold"), Text("")]

    oldest = snap["oldest"]
    wait = oldest.get("oldest_wait_seconds")
    out.append(table(snap["queue_depth"], ["state", "band", "jobs", "runnable"],
                     title=f"QUEUE  queued {oldest.get('queued', 0)} (runnable {oldest.get('runnable', 0)}), "
                           f"running {len(snap['in_flight'])}, "
                           f"oldest waiting {fmt_seconds(wait) if wait is not None else '-'}"))
    out.append(Text(""))

    out.append(table(snap["throughput"], [
        Column("window_minutes", "window (min)"), "replies", "skipped", "dead",
        Column("replies_per_minute", "replies/min"),
        Column("p50_wait_seconds", "p50 wait", _secs), Column("p95_wait_seconds", "p95 wait", _secs),
        Column("p50_latency_seconds", "p50 latency", _secs), Column("p95_latency_seconds", "p95 latency", _secs),
    ], title="THROUGHPUT"))
    out.append(Text(""))

    out.append(table(snap["in_flight"], [
        "id", Column("entity_id", "entity"), "model", Column("priority", "pri"), "server",
        Column("worker_id", "worker", max_width=32), Column("running_seconds", "running", _secs),
        Column("lease_left_seconds", "lease left", _secs), "attempts",
    ], title="IN FLIGHT"))
    out.append(Text(""))

    out.append(table(snap["servers"], [
        "name", "status", "health", Column("failure_count", "failures"), Column("backoff_level", "backoff"),
        Column("backoff_left_seconds", "backoff left", _secs), Column("slots_used", "used"),
        Column("slots_total", "slots"), Column("memory_bytes", "memory", fmt_bytes),
        Column("accounted_bytes", "accounted", fmt_bytes), Column("last_error", "last error", max_width=40),
    ], title="SERVERS"))
    out.append(Text(""))

    out.append(table(snap["slots"], [
        "server", "model", Column("instance_state", "state"), Column("size_bytes", "size", fmt_bytes),
        "parallel", Column("slots_used", "used"), Column("slots_total", "total"), Column("slots_free", "free"),
    ], title="MODELS AND SLOTS"))
    out.append(Text(""))

    if snap.get("unservable"):
        out.append(table(snap["unservable"], [
            "model", "queued", Column("oldest_wait_seconds", "oldest", _secs),
            Column("serving", "why it waits", max_width=110),
        ], title="QUEUED, NO SERVER CAN SERVE YET"))
        out.append(Text(""))

    out.append(table(snap["failed"], [
        "id", "state", Column("entity_id", "entity"), "model", "attempts", Column("reason", max_width=50),
        Column("last_error", "last error", max_width=40), Column("finished_at", "finished"),
    ], title="DEAD AND REJECTED (newest first)"))
    out.append(Text(""))

    out.append(table(snap["entities"], [
        Column("entity_id", "entity"), "queued", "running", "done", "skipped", "dead", "rejected", "cancelled",
    ], title="ENTITIES"))
    out.append(Text(""))

    out.append(table(snap["workers"], [
        Column("worker_id", "worker", max_width=40), "role", "host", "pid",
        Column("heartbeat_age_seconds", "heartbeat", _secs),
    ], title="PROCESSES"))
    return Group(*out)


def open_db(database_url: str | None):
    """A connection for a CLI command; a refused connection is a one-line error, the URL redacted."""
    import psycopg

    from aibot.cli import CliError

    from aibot.db import migrate

    url = db.database_url(database_url)
    try:
        conn = db.connect(url, autocommit=True)
        # Before any work (a refresh logs, asks servers): a schema older than this aibot is one line.
        missing = migrate.pending(url)
    except psycopg.OperationalError as exc:
        detail = (str(exc).strip().splitlines() or ["?"])[-1]
        raise CliError(f"cannot connect to {redact_url(url)}: {detail}") from None
    if missing:
        conn.close()
        names = ", ".join(m.name for m in missing[:3]) + (" …" if len(missing) > 3 else "")
        raise CliError(f"the database at {redact_url(url)} lacks {len(missing)} migration(s) of this aibot "
                       f"({names}): run `aibot migrate` against it (AIBOT_DATABASE_URL)")
    return url, conn


def _report(conn, url: str, failed: int) -> Group:
    return render_status(inspection.status_snapshot(conn, failed_limit=failed), url)


def run_status(args) -> int:
    url, conn = open_db(args.database_url)
    with conn:
        print_(_report(conn, url, args.failed))
    return 0


def run_top(args) -> int:
    """`aibot status` redrawn in place on a terminal; snapshots one after another when plain."""
    url, conn = open_db(args.database_url)
    with conn:
        return live_loop(lambda: _report(conn, url, args.failed), interval=args.interval,
                         iterations=args.iterations, footer=f"refreshing every {args.interval:g}s; Ctrl-C to quit")
