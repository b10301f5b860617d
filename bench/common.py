"""Shared plumbing for the speed-up benchmarks: a scratch database, a simulated cluster with the real
aibot processes in front of it, recorders that timestamp what the servers and the chat see, progress
lines, tables, JSON and PNG output.

Why everything runs in one process (except aibot itself): the simulators, the fake chat server and
the enqueueing all share one clock (`time.perf_counter`), so "enqueued → first byte at the server →
reply at the chat" are differences of one clock, with no cross-process skew. aibot runs exactly as an
operator runs it: `dramatiq aibot.actors` and `aibot scheduler` subprocesses (aibot.harness).

The machine the numbers come from is small and shared (2 cores), so every benchmark compares aibot and
its baseline *in the same run* and reports ratios; absolute seconds are printed only as context.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:      # `python bench/x.py` puts bench/ first; the package lives one up
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from aibot import db  # noqa: E402
from aibot.db import migrate
from aibot.harness import Stack, entity, procs, write_config  # noqa: E402
from aibot.settings import redact_url
from aibot.sim import SimCluster  # noqa: E402
from aibot.sim.chat import FakeChatServer  # noqa: E402
from aibot.sim.cluster import ClusterSpec  # noqa: E402
from aibot.sim.http import Request  # noqa: E402
from aibot.sim.server import SimServer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
GB = 1_000_000_000
MARKER = re.compile(r"\bq(\d{6})q\b")   # message key embedded in the text, found again in the prompt


def now() -> float:
    return time.perf_counter()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# command line, host, output
# ---------------------------------------------------------------------------------------------------

def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("AIBOT_DATABASE_URL") or DEFAULT_DATABASE_URL,
                   help="Postgres server to create the scratch database(s) on "
                        "(default: AIBOT_DATABASE_URL or %(default)s)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where <name>.json/.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--keep-logs", action="store_true", help="keep the aibot process logs (path printed)")
    return p


def positive_ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A comma-separated list of integers >= 1 from option `flag`, or the parser's error naming it."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        p.error(f"{flag}: expected comma-separated integers >= 1, got {text!r}")
    return values


def host_info() -> dict[str, Any]:
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) * 1024 / 2**30, 1)
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]   # other work on the machine during the run
    except OSError:
        load = None
    return {"machine": platform.machine(), "nproc": os.cpu_count(), "ram_gib": ram,
            "system": platform.system(), "python": platform.python_version(), "loadavg_1_5_15": load}


def code_version() -> dict[str, Any]:
    """The commit measured, and which product files differed from it (results of a dirty tree are
    only comparable with that tree)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    # Porcelain lines are "XY path" and X may be a space: stripping the whole output (as this did before)
    # cut the first path's first letter ("ibot/model_loader.py" in overhead.json of 2026-11-27).
    changed = [line[3:] for line in git("status", "--porcelain", "--", "aibot", "sql").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "uncommitted_product_files": changed}


CODE_AT_START = code_version()   # what the processes of this run were started from


def command_line() -> str:
    """The command as run, repository-relative, with any password in a URL redacted (it goes into JSON
    that is committed)."""
    args = []
    for a in sys.argv:
        if "://" in a:
            a = redact_url(a)
        elif a.startswith(str(REPO) + os.sep):
            a = os.path.relpath(a, REPO)
        args.append(shlex.quote(a))
    return " ".join(["python", *args])


def write_json(out_dir: Path, name: str, doc: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    full = {"benchmark": name, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": host_info(), "command": command_line(), "code": CODE_AT_START, **doc}
    path.write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
    log(f"wrote {path}")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_plot(out_dir: Path, name: str, draw: Callable[[Any], None], *, size=(10, 5)) -> Path | None:
    """Draws with matplotlib's file-only backend; a missing matplotlib skips the plot with a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=size)
    try:
        draw(fig)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    log(f"wrote {path}")
    return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Any], title: str | None = None) -> str:
    from aibot.cli.render import table as view, to_text

    return to_text(view(rows, columns, title=title)).rstrip("\n")


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): an observed value, never an interpolation."""
    data = sorted(values)
    if not data:
        return None
    k = max(1, math.ceil(q / 100 * len(data)))
    return data[min(k, len(data)) - 1]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


# ---------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------

class Ticker:
    """Prints `status()` to stderr while a phase runs, so a long benchmark is visibly alive.

    On a terminal the line is rewritten in place; in a log (run_all, CI) a line every few seconds.
    """

    def __init__(self, label: str, status: Callable[[], str], interval: float | None = None):
        self.label, self.status = label, status
        self.tty = sys.stderr.isatty()
        self.interval = interval or (0.5 if self.tty else 5.0)
        self._stop = threading.Event()
        self._t0 = now()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-ticker")

    def _line(self) -> str:
        try:
            text = self.status()
        except Exception as exc:  # a status probe must never kill the benchmark
            text = f"({type(exc).__name__})"
        return f"[{self.label}] {text}  {now() - self._t0:6.1f}s"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.tty:
                print("\r" + self._line(), end="", file=sys.stderr, flush=True)
            else:
                log(self._line())

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        print(("\r" if self.tty else "") + self._line(), file=sys.stderr, flush=True)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Polls `pred` until truthy (no guessed sleeps); raises TimeoutError naming `what` at the deadline."""
    return procs.wait_until(pred, timeout, what, interval)


# ---------------------------------------------------------------------------------------------------
# scratch database
# ---------------------------------------------------------------------------------------------------

def url_with_dbname(url: str, dbname: str) -> str:
    """The same server, another database, always in URL form (dramatiq-postgres parses URLs)."""
    if "://" not in url:
        params = conninfo_to_dict(url)
        user = params.get("user", "postgres")
        auth = f"{user}:{params['password']}" if params.get("password") else user
        return f"postgresql://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{dbname}"
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@contextlib.contextmanager
def scratch_database(admin_url: str, label: str, tree: Path | None = None) -> Iterator[str]:
    """A fresh migrated database, dropped afterwards even on error or Ctrl-C. With `tree` (another
    checkout) that checkout's `aibot migrate` makes the schema, so a before/after comparison covers
    what lives in SQL (triggers, functions) too."""
    name = f"aibot_bench_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_with_dbname(admin_url, name)
    log(f"scratch database {name} on {redact_url(admin_url)}" + (f", migrated by {tree}" if tree else ""))
    try:
        if tree is None:
            migrate.migrate(url)
        else:
            subprocess.run([sys.executable, "-m", "aibot", "migrate", "--database-url", url], cwd=tree, check=True,
                           env={**os.environ, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# ---------------------------------------------------------------------------------------------------
# recorders
# ---------------------------------------------------------------------------------------------------

@dataclass
class SimRequest:
    server: str
    model: str | None
    key: str | None          # the message key found in the prompt
    arrived: float           # perf_counter when the request reached the simulator's handler
    done: float | None = None
    status: str | None = None


class SimRecorder:
    """Timestamps every chat request at the simulators (arrival and completion, by message key).

    The simulator's own `request_log()` stamps a request only when its handler returns (completion),
    without the request body, so it cannot give "first byte at the server" per job; this wraps
    `SimServer.handle` instead, which runs as soon as the request has been read.
    """

    CHAT_PATHS = ("/v1/chat/completions", "/api/v0/chat/completions")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[SimRequest] = []

    def install(self, sim: SimServer) -> None:
        inner = sim.handle

        def handle(req: Request):
            if req.method != "POST" or req.path not in self.CHAT_PATHS:
                return inner(req)
            rec = SimRequest(sim.name, None, None, now())
            try:
                body = json.loads(req.body or b"{}")
                rec.model = body.get("model")
                text = " ".join(str(m.get("content", "")) for m in body.get("messages", [])[-1:])
                m = MARKER.search(text)
                rec.key = m.group(0) if m else None
            except (ValueError, AttributeError, TypeError):
                pass
            with self._lock:
                self.requests.append(rec)
            reply = inner(req)
            rec.status = str(reply.status)
            if reply.stream is None:
                rec.done = now()
            else:
                # A streamed reply is generated while it is written: done when the stream ends.
                reply.stream = _timed_stream(reply.stream, rec)
            return reply

        sim.handle = handle  # type: ignore[method-assign]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def snapshot(self) -> list[SimRequest]:
        with self._lock:
            return list(self.requests)

    def first_arrival(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.snapshot():
            if r.key and r.key not in out:
                out[r.key] = r.arrived
        return out


def _timed_stream(stream: Iterator[bytes], rec: SimRequest) -> Iterator[bytes]:
    try:
        yield from stream
    finally:
        rec.done = now()


class RecordingChat(FakeChatServer):
    """The fake chat API, noting when each reply arrives (perf_counter, first post per human message)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._arrivals: dict[str, float] = {}
        self._arr_lock = threading.Lock()

    def handle_post(self, body: Any):
        status, out = super().handle_post(body)
        if status == 200 and isinstance(body, dict) and body.get("replyTo") is not None:
            with self._arr_lock:
                self._arrivals.setdefault(str(body["replyTo"]), now())
        return status, out

    def arrivals(self) -> dict[str, float]:
        with self._arr_lock:
            return dict(self._arrivals)

    def reply_count(self) -> int:
        with self._arr_lock:
            return len(self._arrivals)


# ---------------------------------------------------------------------------------------------------
# an aibot deployment against simulators
# ---------------------------------------------------------------------------------------------------

def bench_entity(eid: str, model: str, *, max_tokens: int = 200, **kw: Any) -> dict:
    """An entity whose replies are not shortened by maxTokens (the simulator's reply length rules)."""
    return entity(eid, model, maxTokens=max_tokens, **kw)


def key_of(i: int) -> str:
    return f"q{i:06d}q"


@dataclass
class Deployment:
    """Simulated servers + recording chat + scratch database + the real aibot processes."""

    url: str
    sims: SimCluster
    chat: RecordingChat
    stack: Stack
    config_path: str
    recorder: SimRecorder
    memory_gb: dict[str, float]
    _config: Any = None
    _settings: Any = None       # the aibot processes' settings, parsed once (the stack's env is fixed)
    _seq: int = 0
    _posted: dict[str, str] = field(default_factory=dict)   # key -> entity

    # --- database helpers ----------------------------------------------------------------------
    def query(self, text: str, params: Any = None) -> list[dict]:
        with db.connect(self.url, autocommit=True) as conn:
            return conn.execute(text, params or ()).fetchall()

    def scalar(self, text: str, params: Any = None) -> Any:
        rows = self.query(text, params)
        return next(iter(rows[0].values())) if rows else None

    def states(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in self.query("SELECT state::text, count(*)::int AS n FROM aibot.jobs GROUP BY 1")}

    def slots(self) -> dict[tuple[str, str], int]:
        rows = self.query("SELECT s.name, sl.model, count(*)::int AS n FROM aibot.slots sl "
                          "JOIN aibot.servers s ON s.id = sl.server_id WHERE NOT sl.retired GROUP BY 1, 2")
        return {(r["name"], r["model"]): r["n"] for r in rows}

    def slots_per_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, model), n in self.slots().items():
            out[model] = out.get(model, 0) + n
        return out

    # --- cluster state -------------------------------------------------------------------------
    def sync_cluster(self) -> dict[tuple[str, str], int]:
        """What the scheduler's refresh tick does (servers from config, loaded models, slot rows), run
        once here so the benchmark need not wait up to a whole refresh period."""
        from aibot.cluster import refresh

        database = db.Database(self.url, max_size=2)
        try:
            refresh.refresh_all(database, config_path=self.config_path)
        finally:
            database.close()
        return self.slots()

    # --- processes -------------------------------------------------------------------------------
    def start_workers(self, *, processes: int, threads: int, name: str = "workers"):
        proc = self.stack.start_workers(name, processes=processes, threads=threads, shutdown_timeout_ms=10_000)
        wait_until(lambda: self.scalar("SELECT count(*) FROM aibot.workers WHERE role = 'worker' AND "
                                       "worker_id LIKE %s", (f"{name}:%",)) >= processes
                   or not proc.alive(), 90, f"{processes} worker process(es) to register")
        if not proc.alive():
            raise RuntimeError(f"workers exited at start-up:\n{proc.log()[-3000:]}")
        return proc

    def stop_proc(self, proc) -> None:
        proc.stop(30)
        self.stack.procs.remove(proc)

    def start_scheduler(self):
        return self.stack.start_scheduler()

    # --- traffic ---------------------------------------------------------------------------------
    def config(self):
        if self._config is None:
            from aibot.config import load_config

            self._config = load_config(self.config_path)
        return self._config

    def message(self, entity_id: str, *, priority: int | None = None, words: str = "please answer") -> tuple[str, dict]:
        """Posts a human message to the fake chat (so the sink's PATCH finds it) and returns it."""
        self._seq += 1
        key = key_of(self._seq)
        msg = self.chat.post_human(f"{key} {words}", entity=entity_id, priority=priority, id=key, username="bench")
        self._posted[key] = entity_id
        return key, msg

    def ingest(self, messages: Sequence[dict], conn=None) -> list[int]:
        """The bot's ingest path (jobs + doorbells in one transaction), as `aibot bot`/`aibot enqueue` do."""
        from aibot.bot.ingest import ingest
        from aibot.settings import Settings

        # The rank is computed here, at ingest: with the aging the aibot processes run with (a benchmark
        # may scale AIBOT_AGING_SECONDS with the simulator's speed), not a copy of the default. Parsed
        # once: copying and parsing the environment per call cost 0.3 ms inside the timed ingest.
        if self._settings is None:
            self._settings = Settings.from_sources(self.stack.base_env())
        settings = self._settings
        if conn is not None:
            return ingest(conn, "chat", list(messages), self.config(), settings=settings).job_ids
        with db.connect(self.url, autocommit=True) as c:
            return ingest(c, "chat", list(messages), self.config(), settings=settings).job_ids

    def replay(self, msgs: Sequence[tuple[float, str, dict]], *, t0: float, drain: float, scale: float = 1.0,
               interval: float = 0.05, called: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, str]]:
        """Ingests each (at, model, message) at t0 + at × scale on one connection, then waits up to `drain`
        for every reply (a timeout is a result, not an error); returns when each was sent and its model.
        `called` may be the caller's dict, so a progress line can watch it fill."""
        called = {} if called is None else called
        models: dict[str, str] = {}
        with db.connect(self.url, autocommit=True) as conn:
            for at, model, m in msgs:
                pause = t0 + at * scale - now()
                if pause > 0:
                    time.sleep(pause)
                called[m["id"]] = now()
                models[m["id"]] = model
                self.ingest([m], conn=conn)
            try:
                wait_until(lambda: set(called) <= set(self.chat.arrivals()), drain, "drain", interval)
            except TimeoutError:
                pass
        return called, models

    def wait_replies(self, keys: Iterable[str], timeout: float, label: str) -> dict[str, float]:
        keys = set(keys)

        def status() -> str:
            got = len(keys & set(self.chat.arrivals()))
            return f"{got}/{len(keys)} replies"

        with Ticker(label, status):
            try:
                wait_until(lambda: keys <= set(self.chat.arrivals()), timeout, f"{len(keys)} replies", 0.01)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}; jobs: {self.states()}\n{self.stack.logs()[-4000:]}") from None
        arrivals = self.chat.arrivals()
        return {k: arrivals[k] for k in keys}

    def wait_quiet(self, timeout: float = 60) -> None:
        """No job queued or running and no slot held: the next scenario starts from a clean cluster."""
        wait_until(lambda: self.scalar("SELECT count(*) FROM aibot.jobs WHERE state IN ('queued', 'running')") == 0
                   and self.scalar("SELECT count(*) FROM aibot.slots WHERE job_id IS NOT NULL") == 0,
                   timeout, "the queue to drain")


@contextlib.contextmanager
def deployment(url: str, spec: ClusterSpec, entities: list[dict], *, env: dict[str, str] | None = None,
               keep_logs: bool = False, server_overrides: dict[str, dict] | None = None) -> Iterator[Deployment]:
    """Starts the simulators and the recording chat, writes the entity config, and yields a Deployment
    whose stack stops (SIGTERM, then SIGKILL of the process group) on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="aibot-bench-"))
    recorder = SimRecorder()
    # In-process ingest rings doorbells through the broker that aibot.actors builds from the environment.
    os.environ["AIBOT_DATABASE_URL"] = url
    os.environ.pop("AIBOT_BROKER_URL", None)
    logging.getLogger("aibot").setLevel(logging.ERROR)   # the workers log to files; keep stderr for progress
    with SimCluster(spec) as sims, RecordingChat() as chat:
        for s in sims.servers:
            recorder.install(s)
        memory = {c.name: (c.memory_bytes or 0) / GB for c in spec.servers}
        servers = []
        for s in sims.servers:
            doc = {"name": s.name, "url": s.url, "kind": "lmstudio", "enabled": True}
            if memory[s.name]:
                doc["capabilities"] = {"maxMemory": memory[s.name]}
            doc.update((server_overrides or {}).get(s.name, {}))
            servers.append(doc)
        config_path = write_config(workdir / "config.json", servers=servers, entities=entities)
        stack = Stack(url, config_path, workdir=workdir / "logs", env={
            "AIBOT_CHAT_API_URL": chat.url,
            "AIBOT_SINK": "chat",
            "AIBOT_SHUTDOWN_TIMEOUT": "5",
            **(env or {}),
        })
        d = Deployment(url, sims, chat, stack, config_path, recorder, memory)
        try:
            yield d
        finally:
            stack.stop()
            if keep_logs:
                log(f"aibot logs kept in {workdir / 'logs'}")
            else:
                import shutil

                shutil.rmtree(workdir, ignore_errors=True)


def sim_memory_peak(sim: SimServer) -> int:
    return int(sim.stats()["memory"]["peak_bytes"])


# ---------------------------------------------------------------------------------------------------
# naive baselines
# ---------------------------------------------------------------------------------------------------

class NaiveClient:
    """What a dispatcher without capacity accounting does: POST the chat request and see what happens.

    One httpx client per thread (keep-alive, like aibot's backends). `chat` returns the HTTP status
    and never raises for HTTP errors: a baseline counts failures rather than dying on them.
    """

    def __init__(self, base_url: str, timeout: float = 600.0):
        import httpx

        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def chat(self, model: str, key: str, max_tokens: int = 200) -> int:
        import httpx

        body = {"model": model, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": "You are a bench entity."},
                             {"role": "user", "content": f"{key} please answer"}]}
        try:
            return self._http.post("/v1/chat/completions", json=body).status_code
        except httpx.HTTPError:
            return 0

    def post(self, path: str, body: dict) -> int:
        return self._http.post(path, json=body).status_code

    def close(self) -> None:
        self._http.close()


class MemorySampler:
    """Samples the simulators' accounted memory (models + buffers of generating requests) for plots;
    the exact peak comes from the simulator's own `peak_bytes`, not from these samples."""

    def __init__(self, sims: Sequence[SimServer], interval: float = 0.05):
        self.sims, self.interval = list(sims), interval
        self.t0 = now()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memory")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((now() - self.t0, {s.name: s.engine.stats()["memory"]["used_bytes"]
                                                   for s in self.sims}))

    def __enter__(self) -> MemorySampler:
        self.t0 = now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------
# claim plans: aibot.harness.claim_plans (shared with tests/queue/test_claim_plan.py)
# ---------------------------------------------------------------------------------------------------

from aibot.harness.claim_plans import CANDIDATE_MARK, claim_plans, plan_verdict  # noqa: E402,F401
