"""`aibot enqueue`: queue chat messages given as JSON lines (stdin or a file), and say what became of each.

For operators and scripts: replay a message the chat lost, test an entity, or feed a chat that has no
API. Lines are judged by the same rules as the bot loop; bad lines are recorded as rejected (with the
line number), never fatal.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("enqueue", help="queue chat messages from JSON lines (one message per line)")
    p.add_argument("--file", help="read this file instead of stdin")
    p.add_argument("--source", default="stdin",
                   help="source name recorded on the jobs (dedupe key with the message id; default: stdin). "
                        "Use 'chat' to dedupe against messages the bot read from the chat API")
    p.add_argument("--config", help="entity config (default: AIBOT_CONFIG)")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    p.add_argument("--check", action="store_true", help="show what would be queued; write nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from aibot import db
    from aibot.bot.ingest import ingest, judge
    from aibot.bot.sources import parse_lines
    from aibot.cli import CliError
    from aibot.cli.bot_cmd import load_bot_config, load_settings
    from aibot.cli.render import Column, print_, table

    settings = load_settings()
    config = load_bot_config(args.config or settings.config_path)
    try:
        if args.file:
            with open(args.file, encoding="utf-8") as fh:
                items = parse_lines(fh)
        else:
            items = parse_lines(sys.stdin)
    except OSError as exc:
        raise CliError(f"--file: cannot read {args.file!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"input is not UTF-8: {exc}") from None

    if args.check:
        result = judge(items, config)
    else:
        url = args.database_url or settings.database_url
        if not url:
            raise CliError("no database: set AIBOT_DATABASE_URL or pass --database-url")
        with db.connect(url, autocommit=True) as conn:
            result = ingest(conn, args.source, items, config, settings=settings)

    rows = [{"where": o.label, "message": o.message_id, "entity": o.entity_id, "outcome": o.status,
             "priority": o.priority, "job": o.job_id, "reason": o.reason} for o in result.outcomes]
    print_(table(rows, ["where", "message", "entity", "outcome", Column("priority", align="r"),
                        Column("job", align="r"), Column("reason", max_width=90)], empty="(no messages)"))
    print(("would be: " if args.check else "") + result.summary())
    return 0
