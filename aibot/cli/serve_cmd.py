"""`aibot serve`: the monitor's HTTP API, WebSocket feed, /metrics and dashboard."""

from __future__ import annotations

import logging
from pathlib import Path

from aibot import db
from aibot.settings import redact_url

log = logging.getLogger("aibot.cli.serve")


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP/JSON API, WebSocket events, /metrics and the dashboard")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other address requires a token)")
    p.add_argument("--port", type=int, default=4001, help="port (default 4001; 0 picks a free one)")
    p.add_argument("--token-file", type=Path,
                   help="file holding the API token (else AIBOT_SERVE_TOKEN or AIBOT_SERVE_TOKEN_FILE)")
    p.add_argument("--stats-interval", type=float, default=3.0, help="seconds between WebSocket stats frames")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    p.set_defaults(func=run)


def read_token(token_file: Path | None, environ=None) -> str | None:
    """The serve token: --token-file, else the settings' `serve_token` (AIBOT_SERVE_TOKEN, or the file
    named by AIBOT_SERVE_TOKEN_FILE)."""
    from aibot.cli import CliError
    from aibot.settings import Settings, SettingsError

    if token_file is None:
        try:
            secret = Settings.from_sources(environ).serve_token
        except SettingsError as exc:
            raise CliError(str(exc)) from None
        return None if secret is None else secret.get_secret_value().strip() or None
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise CliError(f"token file {str(token_file)!r} cannot be read: {exc.strerror}") from None
    if not token:
        raise CliError(f"token file {str(token_file)!r} is empty")
    return token


def run(args) -> int:
    from aibot.cli import CliError
    from aibot.web.server import AppServer, ServeError

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port: {args.port} is not a TCP port")
    url = db.database_url(args.database_url)
    token = read_token(args.token_file)
    try:
        server = AppServer(url, host=args.host, port=args.port, token=token, stats_interval=args.stats_interval)
    except ServeError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot bind {args.host}:{args.port}: {exc.strerror}") from None
    print(f"aibot serve: {server.url}/ (dashboard), /metrics, /ws; database {redact_url(url)}"
          + ("; token required" if token else ""), flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0
