"""`aibot config check [PATH]`: validate an entity config before deploying it.

Exit 0 when the config is usable (warnings allowed), 1 when it has errors, so it can gate a deploy
script or a CI job that edits entity files.
"""

from __future__ import annotations

import sys

from aibot.cli.config_report import format_report
from aibot.config.loader import check_config


def register(sub) -> None:
    p = sub.add_parser("config", help="inspect the entity configuration")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", help="validate a config file or directory and print a report")
    check.add_argument("path", nargs="?", default=None,
                       help="config-aientities.json or a directory of <id>.json files "
                            "(default: AIBOT_CONFIG / settings config_path)")
    check.add_argument("--live", action="store_true",
                       help="also ask every enabled server which configured models it offers or holds "
                            "(contacts the servers; exit 1 if a model is offered by none)")
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
    if result.errors:
        return 1
    if getattr(args, "live", False) and result.config is not None:
        return _live(result.config)
    return 0


def _live(config) -> int:
    from aibot.backends.factory import backend_for_server
    from aibot.cli.config_report import table
    from aibot.config.live import check_live, unserved

    findings = check_live(config, backend_for_server)
    print("\nLIVE SERVERS (what each enabled server offers for each configured model)")
    print("\n".join(table(("MODEL", "SERVER", "STATUS", "DETAIL"),
                          [[f.model, f.server, f.status, f.detail] for f in findings], max_width=100)))
    missing = unserved(findings)
    if missing:
        print(f"\nNOT SERVABLE: no reachable server offers {', '.join(missing)}")
        return 1
    print(f"\nOK: every configured model is offered by at least one server")
    return 0
