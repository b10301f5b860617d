"""`aibot servers list|drain|enable`: see the cluster and take a server out of (or back into) rotation."""

from __future__ import annotations

from aibot.cli.render import Column, fmt_bytes, fmt_seconds, print_, table
from aibot.cli.status_cmd import open_db
from aibot.ops import inspection


def register(sub) -> None:
    p = sub.add_parser("servers", help="list servers, drain one, or enable one")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    servers = p.add_subparsers(dest="servers_command", metavar="ACTION")
    servers.required = True

    ls = servers.add_parser("list", help="health, backoff, slots and memory of every server")
    ls.set_defaults(func=run_list)

    drain = servers.add_parser("drain", help="stop new claims on a server; in-flight requests finish")
    drain.add_argument("name", help="server name (as in lmStudioServers)")
    drain.set_defaults(func=run_drain)

    enable = servers.add_parser("enable", help="end a drain and enable the server")
    enable.add_argument("name", help="server name")
    enable.set_defaults(func=run_enable)


def run_list(args) -> int:
    _, conn = open_db(args.database_url)
    with conn:
        rows = inspection.server_health(conn)
    print_(table(rows, [
        "name", "kind", "status", "enabled", "draining", "health", Column("failure_count", "failures"),
        Column("backoff_level", "backoff"), Column("backoff_left_seconds", "backoff left", fmt_seconds),
        Column("slots_used", "used"), Column("slots_total", "slots"), Column("models_loaded", "models"),
        Column("memory_bytes", "memory", fmt_bytes), Column("accounted_bytes", "accounted", fmt_bytes),
        Column("url", max_width=40),
    ], empty="(no servers registered; the scheduler syncs them from the config)"))
    return 0


def _act(args, fn, verb: str) -> int:
    from aibot.cli import CliError

    _, conn = open_db(args.database_url)
    with conn:
        try:
            row = fn(conn, args.name)
        except inspection.ServerNotFound as exc:
            raise CliError(str(exc)) from None
    print(f"server {row['name']} {verb} (enabled={str(row['enabled']).lower()}, "
          f"draining={str(row['draining']).lower()})")
    return 0


def run_drain(args) -> int:
    return _act(args, inspection.drain_server, "draining: no new claims; in-flight requests finish")


def run_enable(args) -> int:
    return _act(args, inspection.enable_server, "enabled")
