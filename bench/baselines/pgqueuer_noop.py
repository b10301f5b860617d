"""PgQueuer no-op jobs on the same Postgres (asyncio, batched dequeue, buffered completion log).

    python -m bench.baselines.pgqueuer_noop worker --batch-size 10    # one worker process
    python -m bench.baselines.pgqueuer_noop install

`enqueue(n)` inserts n jobs with one batched `Queries.enqueue`, so enqueueing is not what is measured.
PgQueuer deletes a finished job from its queue table (and logs it), so "none left" means all done.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

ENTRYPOINT = "noop"


async def _connect():
    import psycopg

    return await psycopg.AsyncConnection.connect(os.environ["BENCH_DATABASE_URL"], autocommit=True)


async def _install() -> None:
    from pgqueuer import PsycopgDriver, Queries

    conn = await _connect()
    async with conn:
        await Queries(PsycopgDriver(conn)).install()


async def _enqueue(n: int) -> None:
    from pgqueuer import PsycopgDriver, Queries

    conn = await _connect()
    async with conn:
        queries = Queries(PsycopgDriver(conn))
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            await queries.enqueue([ENTRYPOINT] * k, [None] * k, [0] * k)


async def _worker(batch_size: int) -> None:
    from pgqueuer import PsycopgDriver, Queries, QueueManager

    conn = await _connect()
    async with conn:
        qm = QueueManager(Queries(PsycopgDriver(conn)))

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job) -> None:
            """Does nothing: what is left is PgQueuer's own cost per job."""

        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, qm.shutdown.set)
        print("pgqueuer worker ready", flush=True)
        await qm.run(batch_size=batch_size)


def install() -> None:
    asyncio.run(_install())


def enqueue(n: int) -> None:
    asyncio.run(_enqueue(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--batch-size", type=int, default=10)
    sub.add_parser("install")
    args = p.parse_args(argv)
    if args.cmd == "install":
        install()
    else:
        asyncio.run(_worker(args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
