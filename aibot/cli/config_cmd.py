"""`aibot config check [PATH]`: validate an entity config before deploying it.

Exit 0 when the config is usable (warnings allowed), 1 when it has errors, so it can gate a deploy
script or a CI job that edits entity files.
"""

from __future__ import annotations

import sys

from aibot.config.loader import check_config
from aibot.config.report import format_report


def register(sub) -> None:
    p = sub.add_parser("config", help="inspect the entity configuration")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", help="validate a config file or directory and print a report")
    check.add_argument("path", nargs="?", default=None,
                       help="config-aientities.json or a directory of <id>.json files "
                            "(default: AIBOT_CONFIG / settings config_path)")
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    path = args.path
    if path is None:
        from pathlib import Path

        from aibot.cli import CliError
        from aibot.cli.bot_cmd import load_settings

        path = load_settings().config_path
        if not Path(path).exists():
            raise CliError(f"no config at {path!r}: set AIBOT_CONFIG to config-aientities.json (or a directory of "
                           "<id>.json files), or pass the path: aibot config check PATH")
    result = check_config(path)
    print(format_report(result), file=sys.stdout)
    return 1 if result.errors else 0
