"""`aibot worker`: the host's Dramatiq workers under a per-process supervisor (aibot.worker.supervisor)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("worker", help="run P worker processes of T threads, restarting a dead one while the others "
                                      "keep working (one Dramatiq master per process)")
    p.add_argument("--processes", "-p", type=int, default=1, help="worker processes (default 1; `aibot plan` prints it)")
    p.add_argument("--threads", "-t", type=int, default=8, help="threads per process (default 8)")
    p.add_argument("dramatiq_args", nargs="*", metavar="DRAMATIQ_ARG",
                   help="passed to each `dramatiq aibot.actors` (after --)")
    p.set_defaults(func=run)


def run(args) -> int:
    from aibot.cli import CliError
    from aibot.settings import get_settings
    from aibot.worker.supervisor import Supervisor

    try:
        sup = Supervisor(args.processes, args.threads, shutdown_timeout_seconds=get_settings().shutdown_timeout,
                         extra=args.dramatiq_args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    sup.install_signal_handlers()
    return sup.run()
