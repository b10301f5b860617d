"""The `aibot` command. Each sibling module `*_cmd.py` contributes subcommands via `register()`.

Discovery keeps command groups in their own small modules with no central list to edit.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from aibot import __version__, log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aibot",
        description="Answer chat messages as AI personas on a cluster of local LLM servers.",
    )
    parser.add_argument("--version", action="version", version=f"aibot {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.endswith("_cmd"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"aibot {args.command}: error: {exc}", file=sys.stderr)
        return 2


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


if __name__ == "__main__":
    sys.exit(main())
