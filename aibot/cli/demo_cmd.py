"""`aibot demo`: a simulated cluster, the bot and workers, synthetic users, live progress and a report."""

from __future__ import annotations

import logging


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the whole system on a simulated two-server cluster and report what it did",
        description="Starts a database (AIBOT_DATABASE_URL, else an embedded PostgreSQL), two simulated Mac "
                    "Studios, a fake chat server, `aibot bot` and Dramatiq workers; synthetic users post for "
                    "--duration simulated seconds; then it drains and prints a report (docs/demo.md).")
    p.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                   help="how long users post, in simulated seconds (wall clock: × --speed; default 60)")
    p.add_argument("--messages", type=int, default=None, metavar="N",
                   help="messages to post (default: 2.5 per simulated second of --duration)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic users (default 1)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="scales every simulated time: loads, replies, the posting window (default 1.0 = "
                        "realistic: ~30 s cold loads, ~3 s replies)")
    p.add_argument("--keep-db", action="store_true",
                   help="keep the embedded demo database (aibot_demo) after the run for inspection")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the processes' log folder after the run (it is always kept when the run fails)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--database-url", help="use this (empty) database instead of AIBOT_DATABASE_URL")
    p.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up waiting for replies this long after posting ends (default 60 + 600 × speed)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="progress refresh (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from aibot.cli import CliError
    from aibot.demo.run import DemoError, DemoOptions, run_demo

    if args.log_level is None:
        # The live block is the demo's output; INFO lines from the in-process simulators would scroll it away.
        logging.getLogger().setLevel(logging.WARNING)
    opts = DemoOptions(duration=args.duration, messages=args.messages, seed=args.seed, speed=args.speed,
                       keep_db=args.keep_db, keep_logs=args.keep_logs, json_path=args.json_path, database_url=args.database_url,
                       drain_timeout=args.drain_timeout, interval=args.interval)
    try:
        return run_demo(opts)
    except DemoError as exc:
        raise CliError(str(exc)) from None
