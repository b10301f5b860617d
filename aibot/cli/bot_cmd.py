"""`aibot bot`: the ingest side. Polls a chat source and turns requests into jobs, until stopped.

It also runs the housekeeping scheduler in-process unless told not to, so a small install is one
`aibot bot` plus `dramatiq aibot.actors`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

log = logging.getLogger("aibot.cli.bot")


def register(sub) -> None:
    p = sub.add_parser("bot", help="poll the chat source and queue a job for every message that asks an entity")
    p.add_argument("--source", choices=("chat", "inbox"),
                   help="chat = the chat API at AIBOT_CHAT_API_URL (default when set); inbox = the aibot.inbox table")
    p.add_argument("--chat-url", help="overrides AIBOT_CHAT_API_URL")
    p.add_argument("--poll-interval", type=float, metavar="SECONDS",
                   help="overrides botSettings.pollingInterval from the config")
    p.add_argument("--batch-size", type=int, default=100, help="messages per request/page (default 100)")
    p.add_argument("--start-at", default="beginning", metavar="beginning|now|MS",
                   help="chat only, first run only (no stored cursor): read all history (default), only messages "
                        "from now on, or after this epoch-milliseconds timestamp")
    p.add_argument("--once", action="store_true", help="read what is available now, queue it, and exit")
    p.add_argument("--no-scheduler", action="store_true", help="do not run the scheduler in this process")
    p.add_argument("--config", help="entity config (default: AIBOT_CONFIG)")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    p.set_defaults(func=run)


def load_settings():
    """Fresh settings from the environment (not the cached ones: the CLI may run many times in one test)."""
    from aibot.cli import CliError
    from aibot.settings import Settings, SettingsError

    try:
        return Settings.from_sources()
    except SettingsError as exc:
        raise CliError(str(exc)) from None


def load_bot_config(path: str):
    from aibot.cli import CliError
    from aibot.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(f"config {path}: {exc}") from None
    except OSError as exc:
        raise CliError(f"config {path}: {exc.strerror or exc}") from None


def start_after_ms(value: str) -> int:
    from aibot.cli import CliError

    if value == "beginning":
        return 0
    if value == "now":
        return int(time.time() * 1000)
    if value.isdigit():
        return int(value)
    raise CliError(f"--start-at: expected 'beginning', 'now' or epoch milliseconds, got {value!r}")


def make_source(args, settings):
    from aibot.bot.sources import ChatSource, InboxSource
    from aibot.cli import CliError

    if args.batch_size < 1:
        raise CliError(f"--batch-size: must be at least 1, got {args.batch_size}")
    chat_url = args.chat_url or settings.chat_api_url
    kind = args.source or ("chat" if chat_url else "inbox")
    if kind == "chat":
        if not chat_url:
            raise CliError("--source chat needs AIBOT_CHAT_API_URL or --chat-url")
        return ChatSource(chat_url, token=settings.chat_api_token, limit=args.batch_size,
                          start_after_ms=start_after_ms(args.start_at))
    return InboxSource(limit=args.batch_size)


def _start_scheduler(settings):
    from aibot.scheduler.runner import start_in_background

    return start_in_background(settings)


def run(args) -> int:
    from aibot import db, log as aibot_log
    from aibot.bot.loop import run_bot
    from aibot.cli import CliError
    from aibot.config import ConfigStore
    from aibot.worker import registry

    settings = load_settings()
    if args.database_url:
        settings = settings.model_copy(update={"database_url": args.database_url})
    if not settings.database_url:
        raise CliError("no database: set AIBOT_DATABASE_URL or pass --database-url")
    if args.poll_interval is not None and args.poll_interval < 0:
        raise CliError(f"--poll-interval: must be >= 0, got {args.poll_interval}")
    config_path = args.config or settings.config_path
    load_bot_config(config_path)             # fail fast on a bad config at start-up
    source = make_source(args, settings)
    aibot_log.bind(worker=aibot_log.default_worker_name("bot"))
    database = db.Database(settings.database_url, max_size=2)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    scheduler = None if (args.no_scheduler or args.once) else _start_scheduler(settings)
    log.info("bot reading %s, config %s", source, config_path)
    try:
        with contextlib.ExitStack() as registered:
            if not args.once:   # a long-running process shows under PROCESSES (aibot status/top, /metrics)
                registered.enter_context(registry.Registered(
                    database, "bot", worker_id=aibot_log.default_worker_name("bot"),
                    info={"source": str(source), "config": config_path}))
                if scheduler is not None:
                    registered.enter_context(registry.Registered(database, "scheduler", worker_id=scheduler.name,
                                                                 info={"in": "aibot bot"}))
            stats = run_bot(settings, ConfigStore(config_path), source, stop, database=database,
                            poll_interval=args.poll_interval, once=args.once)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if scheduler is not None:
            scheduler.stop()
        database.close()
        close = getattr(source, "close", None)
        if close:
            close()
    summary = (f"{stats.polls} poll(s): {stats.new} new, {stats.duplicate} duplicate, {stats.rejected} rejected, "
               f"{stats.ignored} ignored, {stats.errors} error(s)")
    log.info("bot stopped: %s", summary)
    if args.once:
        print(summary)
        if stats.errors:
            print(f"last error: {stats.last_error}")
    return 1 if (args.once and stats.errors) else 0
