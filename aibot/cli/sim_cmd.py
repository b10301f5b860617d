"""`aibot sim`: run simulated LLM servers until SIGTERM/SIGINT, for the demo, benchmarks and tests that want
a separate process.

Protocol on stdout (flushed): one line `<name> <url>` per server, then `READY`. Logs go to stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from aibot.cli import CliError
from aibot.sim.catalog import CatalogError
from aibot.sim.cluster import ClusterSpec, SimCluster, seed_spec
from aibot.sim.config import APIS, LMSTUDIO_VERSIONS, SimConfigError
from aibot.sim.faults import FaultConfig, FaultConfigError


def register(sub) -> None:
    p = sub.add_parser("sim", help="run simulated LLM servers (LM Studio, llama.cpp, Ollama, OpenAI) on loopback",
                       description="Starts simulated LLM servers, prints '<name> <url>' per server and 'READY', "
                                   "and serves until SIGTERM or SIGINT. Without --spec it starts the seed's "
                                   "cluster shape, adjusted by the flags.")
    p.add_argument("--spec", help="JSON cluster spec (see docs/simulator.md); the shape flags are then ignored")
    p.add_argument("--servers", type=int, default=2, help="number of servers (default 2)")
    p.add_argument("--memory-gb", type=float, default=128, help="memory budget per server in GB (default 128)")
    p.add_argument("--models", type=int, default=6, help="models in each server's catalogue (default 6)")
    p.add_argument("--model-gb", type=float, default=15, help="size of each model in GB (default 15)")
    p.add_argument("--parallel", default="1,4",
                   help="parallel slots per loaded model, per server, cycled (default '1,4')")
    p.add_argument("--speed", type=float, default=1.0, help="time scale: 1 = realistic, 0.01 = 100x faster")
    p.add_argument("--api", default="lmstudio", choices=APIS)
    p.add_argument("--lmstudio-version", default="0.4", choices=LMSTUDIO_VERSIONS)
    p.add_argument("--port", type=int, default=0, help="first port (servers use port, port+1, ...); 0 = any free")
    p.add_argument("--preload", default="none", help="'all', 'none' or comma-separated model keys")
    p.add_argument("--no-jit", action="store_true", help="refuse chats for models that are not loaded")
    p.add_argument("--jit-race", action="store_true", help="concurrent JIT requests each load a copy (#1751)")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of chat requests answered 5xx")
    p.add_argument("--seed", type=int, default=0, help="random seed for faults and reply options")
    p.add_argument("--api-token-env", metavar="VAR",
                   help="require 'Authorization: Bearer <token>', the token read from environment variable VAR")
    p.set_defaults(func=run)


def build_spec(args) -> ClusterSpec:
    if args.spec:
        return ClusterSpec.from_file(args.spec)
    try:
        parallel = [int(x) for x in str(args.parallel).split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--parallel: {args.parallel!r} must be comma-separated integers, e.g. 1,4") from None
    preload: list[str] | str
    if args.preload == "all":
        preload = "all"
    elif args.preload in ("", "none"):
        preload = []
    else:
        preload = [k.strip() for k in args.preload.split(",") if k.strip()]
    common = {"jit": not args.no_jit, "jit_race": args.jit_race, "seed": args.seed,
              "lmstudio_version": args.lmstudio_version}
    if args.error_rate:
        common["faults"] = FaultConfig(error_rate=args.error_rate)
    if args.api_token_env:
        token = os.environ.get(args.api_token_env)
        if not token:
            raise CliError(f"--api-token-env: environment variable {args.api_token_env} is not set or empty")
        common["api_token"] = token
    return seed_spec(speed=args.speed, api=args.api, servers=args.servers, memory_gb=args.memory_gb,
                     models=args.models, model_gb=args.model_gb, parallel=parallel, preload=preload,
                     port_base=args.port, **common)


def run(args) -> int:
    try:
        spec = build_spec(args)
        cluster = SimCluster(spec)
    except (SimConfigError, CatalogError, FaultConfigError) as exc:
        raise CliError(str(exc)) from None
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            cluster.start()
        except (SimConfigError, OSError) as exc:
            raise CliError(f"could not start the simulator: {exc}") from None
        for server in cluster:
            print(f"{server.name} {server.url}")
        print("READY", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        cluster.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    print("STOPPED", flush=True)
    sys.stdout.flush()
    return 0
