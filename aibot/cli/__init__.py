"""The `aibot` command. Each sibling module `*_cmd.py` contributes subcommands via `register()`.

Discovery keeps command groups in their own small modules with no central list to edit.

Every failure a user can fix is one line on stderr, `aibot <command>: error: <what is wrong and how to
fix it>`, with exit code 2 (argparse's code for usage errors, used for configuration errors too): a
missing database URL, a database that cannot be reached, a schema that needs `aibot migrate`. Anything
else is a bug: one line naming it, exit code 1, and the traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from aibot import __version__, log

EXIT_USAGE = 2
EXIT_BUG = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aibot",
        description="Answer chat messages as AI personas on a cluster of local LLM servers.",
    )
    parser.add_argument("--version", action="version", version=f"aibot {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    parser.add_argument("--plain", action="store_true",
                        help="plain text output (no colour, no live redraw); also when stdout is not a terminal "
                             "or NO_COLOR is set")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.endswith("_cmd"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    _anywhere(parser, ("--plain", "--debug"))
    return parser


def _anywhere(parser: argparse.ArgumentParser, flags: tuple[str, ...]) -> None:
    """Lets the global switches follow the subcommand too (`aibot status --plain`, as the README writes
    it). SUPPRESS as the subcommand's default keeps an absent switch from resetting the global one."""
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.option_strings[0] in flags}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                have = {o for a in child._actions for o in a.option_strings}
                for flag in flags:
                    if flag not in have:
                        child.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=helps[flag])
                _anywhere(child, flags)


def main(argv: list[str] | None = None) -> int:
    from aibot import settings
    from aibot.cli import render

    parser = build_parser()
    args = parser.parse_args(argv)
    settings.reset_settings()   # one invocation, one reading of the environment (tests run many in-process)
    log.setup(args.log_level or _settings_log_level())
    # Lines from threads aibot does not start (psycopg_pool's, apscheduler's) still name the process.
    log.bind_process(worker=log.default_worker_name(args.command))
    render.configure(plain=args.plain)
    command = " ".join(w for w in (args.command, *_subcommand(args)) if w)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        return _fail(command, str(exc), EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the rest
        if args.debug:
            raise
        known = explain(exc)
        if known is not None:
            return _fail(command, known, EXIT_USAGE)
        return _fail(command, f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the "
                              "traceback)", EXIT_BUG)


def _settings_log_level() -> str:
    """AIBOT_LOG_LEVEL, or INFO; a malformed setting is reported by the command that needs it."""
    from aibot.settings import SettingsError, get_settings

    try:
        return get_settings().log_level or "INFO"
    except SettingsError:
        return "INFO"


def _subcommand(args) -> list[str]:
    return [v for k, v in vars(args).items() if (k.endswith("_command") or k == "action") and isinstance(v, str)]


def _fail(command: str, message: str, code: int) -> int:
    print(f"aibot {command}: error: {message}", file=sys.stderr)
    return code


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def explain(exc: Exception) -> str | None:
    """The one-line diagnosis of an error the user can fix, or None for a bug."""
    import psycopg
    from psycopg import errors

    from aibot import db
    from aibot.settings import SettingsError
    from aibot.settings import redact_url

    if isinstance(exc, (db.NoDatabaseConfigured, SettingsError)):
        return str(exc)
    if isinstance(exc, (errors.UndefinedTable, errors.InvalidSchemaName, errors.UndefinedFunction,
                        errors.UndefinedColumn, errors.UndefinedObject)):
        return (f"the database has no aibot schema, or an older one ({_first_line(exc)}): run `aibot migrate` "
                "against it (AIBOT_DATABASE_URL)")
    if isinstance(exc, psycopg.OperationalError):
        detail = (str(exc).strip().splitlines() or ["?"])[-1]
        return (f"cannot reach the database: {redact_url(detail)}; check AIBOT_DATABASE_URL and that "
                "Postgres is running")
    return None


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


if __name__ == "__main__":
    sys.exit(main())
