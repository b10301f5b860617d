"""The long chaos run: 500 messages through two bots, two schedulers and two Dramatiq masters while
workers are killed (-9 and SIGTERM), Postgres sessions are terminated, Postgres restarts (local
cluster only), a simulated server is down for 20 s and the servers and chat sink fail at random.

    python bench/chaos.py                      # an embedded PostgreSQL (pgserver): no restart event
    python bench/chaos.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database on that server (dropped at the end), runs `tests.chaos.harness.ChaosRun`
at the deployment's default lease (20 s; `--lease-seconds` overrides) and writes
bench/results/chaos.json: the schedule, what each event hit, outcome counts, injected faults, what a
non-deduplicating sink would have shown (repeats, regenerations), unhandled tracebacks per process,
recovery times, timings and any violated promise. Exit status 1 when a promise was broken.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aibot.db import migrate  # noqa: E402
from tests.support import pg  # noqa: E402
from tests.chaos.harness import ChaosConfig, ChaosRun, write_result  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "chaos.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", help="a server where a scratch database may be created "
                                          "(default: an embedded PostgreSQL, never restarted)")
    p.add_argument("--lease-seconds", type=int, default=None, help="default: the deployment default (20 s)")
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--feed-seconds", type=float, default=120.0)
    p.add_argument("--outage-seconds", type=float, default=20.0)
    p.add_argument("--no-pg-restart", action="store_true", help="never restart PostgreSQL")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.messages < 1:
        p.error(f"--messages must be >= 1, got {args.messages}")

    commit = _commit()   # the code measured: taken before the run, not after it
    with contextlib.ExitStack() as stack:
        server = args.database_url or stack.enter_context(pg.server_url())
        name = pg.unique_name("aibot_chaos")
        url = pg.create_database(server, name)
        try:
            migrate.migrate(url)
            cfg = ChaosConfig(messages=args.messages, seed=args.seed, feed_seconds=args.feed_seconds,
                              outage_seconds=args.outage_seconds, worker_kills=5, master_kills=2, terms=2,
                              backend_kills=2, quiesce_timeout=300, lease_seconds=args.lease_seconds,
                              pg_restart=False if args.no_pg_restart else None)
            workdir = Path(tempfile.mkdtemp(prefix="aibot-chaos-"))
            result = ChaosRun(url, workdir, cfg, log=lambda line: print(line, file=sys.stderr, flush=True)).run()
        finally:
            pg.drop_database(server, name)
    result.timings["finished_at"] = datetime.now(timezone.utc).isoformat()
    result.config["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    result.config["logs"] = str(workdir)
    result.config["commit"] = commit
    write_result(result, args.out)
    print(result.summary())
    print(f"wrote {args.out}; process logs in {workdir}")
    if result.errors or result.violations:
        return 1
    return 0


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
