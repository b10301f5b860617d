"""`aibot migrate`: bring the database schema up to date (safe to run from several hosts at once)."""

from __future__ import annotations

from aibot import db
from aibot.db import migrate
from aibot.settings import redact_url


def register(sub) -> None:
    p = sub.add_parser("migrate", help="apply pending SQL migrations to AIBOT_DATABASE_URL")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    p.add_argument("--dry-run", action="store_true", help="list pending migrations and change nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    url = db.database_url(args.database_url)
    if args.dry_run:
        todo = migrate.pending(url)
        for m in todo:
            print(f"pending  {m.name}")
        print(f"{len(todo)} pending migration(s) on {redact_url(url)}")
        return 0
    applied = migrate.migrate(url, progress=lambda m: print(f"applying {m.name} ...", flush=True))
    print(f"{len(applied)} migration(s) applied; {redact_url(url)} is up to date")
    return 0
