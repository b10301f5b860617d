"""What the bot's ingest of one message costs with nothing else running (issue 13): the floor under the
`ingest` stage of `dispatch_latency.py --stages`.

    python bench/ingest_cost.py [--calls 400] [--sync-commit on|off]

One process, one autocommit connection to a scratch database, `aibot.bot.ingest.ingest` called once per
message (the bot's own path: rules, then the job insert, the cursor and the doorbell pipelined in one
transaction), no workers and no simulators. Reported per call: wall time and this process's CPU time
(p50 / p90 / p99), so wall − CPU is Postgres plus the round trip. `--sync-commit off` runs the same
calls with `synchronous_commit = off` on the session: the difference is what waiting for the WAL flush
costs on this disk. Writes bench/results/ingest_cost.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common  # bench/common.py; also puts the repository on sys.path

from aibot import db  # noqa: E402
from aibot.bot.ingest import ingest  # noqa: E402
from aibot.config import load_config  # noqa: E402
from aibot.harness import entity, write_config  # noqa: E402

NAME = "ingest_cost"
WARM = 100


def measure(url: str, config, calls: int, sync_commit: str) -> dict:
    settings = SimpleNamespace(aging_seconds=30.0)
    wall, cpu = [], []
    with db.connect(url, autocommit=True) as conn:
        conn.execute(f"SET synchronous_commit = {'on' if sync_commit == 'on' else 'off'}")
        for i in range(WARM + calls):
            msg = {"id": f"{sync_commit}-{i}", "text": "hello there", "username": f"u{i}", "message-type": "human",
                   "botParams": {"entity": f"e{i % 6}"}}
            t, c = time.perf_counter(), time.process_time()
            ingest(conn, "chat", [msg], config, settings=settings)
            if i >= WARM:
                wall.append((time.perf_counter() - t) * 1000)
                cpu.append((time.process_time() - c) * 1000)
    pct = {f"{name}_p{q}_ms": round(common.percentile(v, q), 3) for name, v in (("wall", wall), ("cpu", cpu))
           for q in (50, 90, 99)}
    return {"synchronous_commit": sync_commit, "calls": calls, **pct}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--sync-commit", default="on,off", help="comma-separated: on, off (default both, alternating)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.sync_commit.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        p.error(f"--sync-commit: expected on and/or off, got {args.sync_commit!r}")
    with tempfile.TemporaryDirectory(prefix="aibot-ingest-") as tmp:
        config = load_config(write_config(Path(tmp) / "config.json",
                                          servers=[{"name": "s", "url": "http://127.0.0.1:9", "kind": "lmstudio"}],
                                          entities=[entity(f"e{i}", f"m{i}") for i in range(6)]))
        rows = []
        with common.scratch_database(args.database_url, NAME) as url:
            for mode in modes + modes:          # each mode twice, alternating: drift shows as a difference
                rows.append(measure(url, config, args.calls, mode))
                common.log(f"synchronous_commit {mode}: wall p50 {rows[-1]['wall_p50_ms']} ms, "
                           f"cpu p50 {rows[-1]['cpu_p50_ms']} ms")
    print(common.table(rows, ["synchronous_commit", "calls", "wall_p50_ms", "wall_p90_ms", "wall_p99_ms",
                              "cpu_p50_ms", "cpu_p90_ms", "cpu_p99_ms"],
                       title="ingest() of one message, nothing else running"))
    common.write_json(args.output_dir, NAME, {"parameters": {"calls": args.calls, "modes": modes}, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
