"""`aibot models list|load|unload`: what each server holds, and loads/unloads through the single-flight
loader (so an operator's load can never race the scheduler's or another operator's)."""

from __future__ import annotations

from aibot import db
from aibot.cli.render import Column, Ticker, fmt_bytes, print_, table
from aibot.cluster import loader, refresh
from aibot.cluster.sizing import GB
from aibot.ops import inspection


def register(sub) -> None:
    p = sub.add_parser("models", help="list resident models; load or unload one (single-flight, memory-checked)")
    p.add_argument("--database-url", help="overrides AIBOT_DATABASE_URL")
    models = p.add_subparsers(dest="models_command", metavar="ACTION")
    models.required = True

    ls = models.add_parser("list", help="models resident on each server, with slots and requests in flight")
    ls.add_argument("--refresh", action="store_true", help="ask the servers first")
    ls.set_defaults(func=run_list)

    load = models.add_parser("load", help="load MODEL on SERVER ('any': let placement choose)")
    load.add_argument("server")
    load.add_argument("model")
    load.add_argument("--size-gb", type=float, default=None,
                      help="model size for the memory check when it was never seen loaded (default: last seen, else 15)")
    load.add_argument("--wait", type=float, default=loader.DEFAULT_WAIT_SECONDS,
                      help="seconds to wait for another loader of the same model")
    load.add_argument("--min-residency", type=float, default=120.0,
                      help="idle models loaded more recently than this many seconds are not evicted")
    load.set_defaults(func=run_load)

    unload = models.add_parser("unload", help="unload MODEL from SERVER")
    unload.add_argument("server")
    unload.add_argument("model")
    unload.add_argument("--force", action="store_true", help="unload even with requests in flight (they fail and retry)")
    unload.set_defaults(func=run_unload)


def run_list(args) -> int:
    from aibot.cli.status_cmd import open_db

    url, conn = open_db(args.database_url)
    with conn:
        if args.refresh:
            database = db.Database(url, max_size=2)
            try:
                refresh.refresh_all(database)
            finally:
                database.close()
        rows = inspection.resident_models(conn)
    print_(table(rows, ["server", "model", "state", Column("size_bytes", "size", fmt_bytes), "parallel",
                        Column("context_length", "context"), "slots", Column("held", "in flight"),
                        Column("loaded_at", "loaded"), Column("last_used_at", "last used")],
                 empty="(no models known; run `aibot models list --refresh` or start the scheduler)"))
    return 0


class _Progress:
    """Prints the loader's events; while a cold load runs, a spinner with the elapsed time (a line every
    few seconds when plain)."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self._ticker: Ticker | None = None

    def __call__(self, event: str, **info) -> None:
        server, model = info.get("server"), info.get("model")
        if event == "waiting":
            print(f"waiting: {model} on {server} is being handled by another loader ({info.get('state')})", flush=True)
        elif event == "evicting":
            print(f"evicting idle {model} from {server} to make room", flush=True)
        elif event == "loading":
            size = info.get("size_bytes")
            self.close()
            self._ticker = Ticker(f"loading {model} on {server}" + (f" (~{fmt_bytes(size)})" if size else "") + " ...",
                                  interval=self.interval).__enter__()
        elif event == "loaded":
            self.close()
            print(f"loaded {model} on {server} in {info.get('seconds', 0):.1f}s "
                  f"(parallel {info.get('parallel') or 1}, {fmt_bytes(info.get('size_bytes') or 0)})", flush=True)
        elif event == "ready":
            print(f"{model} is already loaded on {server}", flush=True)
        elif event == "unloading":
            print(f"unloading {model} from {server} ...", flush=True)
        elif event == "unloaded":
            print(f"unloaded {model} from {server}", flush=True)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.__exit__(None, None, None)
            self._ticker = None


def run_load(args) -> int:
    from aibot.cli import CliError

    url = db.database_url(args.database_url)
    progress = _Progress()
    try:
        res = loader.ensure_loaded(
            url, args.model, server=None if args.server == "any" else args.server, worker_id="cli",
            size_bytes=int(args.size_gb * GB) if args.size_gb else None, wait_s=args.wait,
            min_residency_s=args.min_residency, progress=progress)
    except loader.LoadError as exc:
        raise CliError(str(exc)) from None
    finally:
        progress.close()
    if res.evicted:
        print(f"evicted: {', '.join(res.evicted)}")
    return 0


def run_unload(args) -> int:
    from aibot.cli import CliError

    url = db.database_url(args.database_url)
    try:
        done = loader.unload(url, args.server, args.model, worker_id="cli", force=args.force,
                                   progress=_Progress())
    except loader.LoadError as exc:
        raise CliError(str(exc)) from None
    if not done:
        print(f"{args.model} is not loaded on {args.server}")
    return 0
