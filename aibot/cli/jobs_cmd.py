"""`aibot jobs list|show|retry|cancel`: read jobs and act on them through the SQL functions."""

from __future__ import annotations

import json

from aibot.cli.render import Column, print_, table
from aibot.cli.status_cmd import open_db
from aibot.ops import inspection


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list, show, retry or cancel jobs")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    jobs = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    jobs.required = True

    ls = jobs.add_parser("list", help="newest jobs first")
    ls.add_argument("--state", choices=inspection.JOB_STATES, help="only jobs in this state")
    ls.add_argument("--entity", help="only jobs of this entity id")
    ls.add_argument("--limit", type=int, default=50, help="at most this many rows (50)")
    ls.set_defaults(func=run_list)

    show = jobs.add_parser("show", help="every field of one job, with payload and stored reply")
    show.add_argument("id", type=int, help="job id")
    show.set_defaults(func=run_show)

    retry = jobs.add_parser("retry", help="requeue a dead/cancelled/rejected/skipped job with fresh attempts")
    retry.add_argument("id", type=int, help="job id")
    retry.set_defaults(func=run_retry)

    cancel = jobs.add_parser("cancel", help="cancel a queued (or dead) job; running jobs are refused")
    cancel.add_argument("id", type=int, help="job id")
    cancel.add_argument("--reason", default="cancelled by an operator (aibot jobs cancel)", help="recorded reason")
    cancel.set_defaults(func=run_cancel)


def _fail(exc: Exception) -> int:
    from aibot.cli import CliError

    raise CliError(str(exc)) from None


def run_list(args) -> int:
    _, conn = open_db(args.database_url)
    with conn:
        try:
            rows = inspection.list_jobs(conn, state=args.state, entity=args.entity, limit=args.limit)
        except ValueError as exc:
            return _fail(exc)
    # A queued job's reason is why it still waits (the loader's note); a finished one's, how it ended.
    rows = [{**r, "reason": r["reason"] or r.get("waiting_reason")} for r in rows]
    print_(table(rows, [
        "id", "state", Column("entity_id", "entity"), "model", Column("priority", "pri"), "band", "attempts",
        "server", Column("created_at", "created"), Column("finished_at", "finished"),
        Column("reason", max_width=40), Column("message", max_width=40),
    ], empty="(no jobs match)"))
    return 0


def render_job(job: dict) -> str:
    """Scalar fields as `key: value` lines, then payload and reply as indented JSON."""
    lines = []
    width = max(len(k) for k in job)
    for key, value in job.items():
        if key in ("payload", "reply"):
            continue
        lines.append(f"{key.rjust(width)}: {'-' if value is None else value}")
    for key in ("payload", "reply"):
        if job.get(key) is not None:
            lines.append(f"{key}:")
            lines.append("  " + json.dumps(job[key], indent=2, ensure_ascii=False, default=str).replace("\n", "\n  "))
    return "\n".join(lines)


def run_show(args) -> int:
    _, conn = open_db(args.database_url)
    with conn:
        try:
            job = inspection.get_job(conn, args.id)
        except inspection.InspectionError as exc:
            return _fail(exc)
    print(render_job(job))
    return 0


def run_retry(args) -> int:
    _, conn = open_db(args.database_url)
    with conn:
        try:
            row = inspection.requeue_job(conn, args.id)
        except inspection.InspectionError as exc:
            return _fail(exc)
    print(f"job {row['id']} requeued (state {row['state']}, attempts reset)")
    return 0


def run_cancel(args) -> int:
    _, conn = open_db(args.database_url)
    with conn:
        try:
            row = inspection.discard_job(conn, args.id, args.reason)
        except inspection.InspectionError as exc:
            return _fail(exc)
    print(f"job {row['id']} cancelled ({row['reason']})")
    return 0
