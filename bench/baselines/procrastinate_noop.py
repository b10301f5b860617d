"""Procrastinate no-op jobs on the same Postgres (the competitor with its own LISTEN/NOTIFY worker).

    python -m bench.baselines.procrastinate_noop worker --concurrency T     # one worker process
    python -m bench.baselines.procrastinate_noop install                      # schema into BENCH_DATABASE_URL

`enqueue(url, n)` defers n jobs with `batch_defer` (one INSERT), so enqueueing is not what is measured.
Completed jobs are kept (procrastinate's default), as aibot keeps its done rows.
"""

from __future__ import annotations

import argparse
import os
import sys

import procrastinate

TASK = "noop"


def make_app() -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ["BENCH_DATABASE_URL"]))

    @app.task(name=TASK, queue="noop")
    async def noop() -> None:
        """Does nothing: what is left is procrastinate's own cost per job."""

    return app


def install() -> None:
    app = make_app()
    with app.open():
        app.schema_manager.apply_schema()


def enqueue(n: int) -> None:
    app = make_app()
    with app.open():
        task = app.tasks[TASK]
        for start in range(0, n, 5000):
            task.batch_defer(*({} for _ in range(min(5000, n - start))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--concurrency", type=int, default=8)
    sub.add_parser("install")
    args = p.parse_args(argv)
    if args.cmd == "install":
        install()
        return 0
    make_app().run_worker(queues=["noop"], concurrency=args.concurrency, install_signal_handlers=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
