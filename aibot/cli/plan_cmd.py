"""`aibot plan`: per server, the slots the sizing formula gives from live cluster state, and per worker
host the Dramatiq command that can drive them all."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from aibot import db
from aibot.cluster import plan as plans
from aibot.cluster import refresh, sizing
from aibot.scheduler import jobs

from aibot.cli.render import Column, fmt_bytes, print_, table


def register(sub) -> None:
    p = sub.add_parser("plan", help="capacity plan: slots per server (the seed's formula) and the worker command")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    p.add_argument("--config", help="entity config to sync servers from (default: AIBOT_CONFIG)")
    p.add_argument("--no-refresh", action="store_true",
                   help="use the state in Postgres as is; do not ask the servers what they hold")
    p.add_argument("--processes", type=int, default=None,
                   help="Dramatiq processes per worker host (default: live processes seen, else CPU count)")
    p.set_defaults(func=run)


def run(args) -> int:
    from aibot.cli import CliError
    from aibot.cli.status_cmd import open_db

    if args.processes is not None and args.processes < 1:
        raise CliError(f"--processes must be >= 1, got {args.processes}")
    url, conn = open_db(args.database_url)
    with conn:
        if not args.no_refresh:
            database = db.Database(url, max_size=2)
            try:
                summary = jobs.describe_refresh(refresh.refresh_all(database, config_path=args.config))
            finally:
                database.close()
            if summary:
                print(f"refreshed: {summary}\n")
        p = plans.plan(conn, processes=args.processes, config_path=args.config)
    print_(format_plan(p))
    return 0


def format_plan(p: plans.Plan) -> Group:
    out = []
    if p.basis == "config":
        placed = sum(1 for c in p.cold if c.server)
        out.append(Text(f"cold cluster: planned from configuration (no server holds a model yet; the {len(p.cold)} "
                        f"configured model(s) placed as the loader will load them, {placed} of them fit)\n"))
    rows = [{
        "server": s.name, "kind": s.kind, "state": _state(s), "ram": s.memory_bytes, "source": s.memory_source,
        "models": sum(1 for m in s.models if m.state == "loaded"), "parallel": s.sizing.parallel_total,
        "bound": s.sizing.memory_bound, "cap": s.sizing.hard_cap, "slots": s.sizing.slots,
        "limit": s.sizing.limited_by, "rows": sum(m.rows for m in s.models),
        "inflight": sum(m.held for m in s.models),
    } for s in p.servers]
    out.append(table(rows, [
        "server", "kind", "state", Column("ram", "RAM", fmt_bytes), Column("source", "RAM from"),
        Column("models", "models"), Column("parallel", "Σ parallel"), Column("bound", "memory bound"),
        Column("cap", "cap"), Column("slots", "slots"), Column("limit", "limited by"),
        Column("rows", "slot rows"), Column("inflight", "in flight"),
    ], title="Servers  (slots = min(Σ parallel, floor((RAM − reserve − models − safety) / per-request), cap))",
        empty="(no servers; sync them from the config or run without --no-refresh)"))
    for s in p.servers:
        if not s.models:
            continue
        out.append(Text(""))
        out.append(table([{"model": m.model, "state": m.state, "size": m.size_bytes, "parallel": m.parallel,
                            "target": m.target, "rows": m.rows, "held": m.held} for m in s.models],
                          ["model", "state", Column("size", fmt=fmt_bytes), "parallel",
                           Column("target", "slots"), Column("rows", "slot rows"), Column("held", "in flight")],
                          title=f"{s.name}: {_arithmetic(s)}"))
    if p.basis == "config":
        out.append(Text(""))
        out.append(table([{"model": c.model, "size": c.size_bytes, "source": c.size_source,
                           "server": c.server or "(none)", "why": c.reason or ""} for c in p.cold],
                         ["model", Column("size", fmt=fmt_bytes), Column("source", "size from"),
                          Column("server", "will load on"), Column("why", "why not", max_width=80)],
                         title="Configured models (where the loader will put them)"))
    out.append(Text(""))
    out.append(Text(p.cap_line))
    where = "usable servers" if p.basis == "live" else "the servers once they hold the configured models"
    out.append(Text(f"Workers: {p.total_slots} slot(s) on {where}. Each in-flight generation occupies one "
               f"worker thread while it waits on HTTP, so every worker host runs processes × threads >= "
               f"{p.total_slots} (each host alone can fill every slot; losing a host costs no capacity):"))
    out.append(table([{"host": h.host, "live": h.live_processes or None, "command": h.command} for h in p.hosts],
                      [Column("host", "worker host"), Column("live", "live processes"),
                       Column("command", max_width=80)]))
    return Group(*out)


def _state(s: plans.ServerPlan) -> str:
    if not s.enabled:
        return "disabled"
    return s.health if s.usable or s.health == "down" else f"{s.health}, backed off/draining"


def _arithmetic(s: plans.ServerPlan) -> str:
    z = s.sizing
    if s.memory_bytes is None:
        return "RAM unknown, no memory bound (set capabilities.maxMemory)"
    used = z.models_bytes + z.slots * z.per_request_bytes + z.reserve_bytes + z.safety_bytes
    return (f"models {sizing.gb(z.models_bytes)} + {z.slots} × {sizing.gb(z.per_request_bytes)} requests"
            f" + system {sizing.gb(z.reserve_bytes)} + safety {sizing.gb(z.safety_bytes)}"
            f" = {sizing.gb(used)} of {sizing.gb(s.memory_bytes)}")
