"""`aibot demo`: the whole product on one machine, in one command, with a report at the end.

It wires the real pieces together exactly as production does: a database (the user's, or an embedded
PostgreSQL), migrations, two simulated Mac Studios shaped like the seed's, the fake chat server,
`aibot bot` (with its scheduler) and `dramatiq aibot.actors` as subprocesses, and synthetic users
posting to the chat. The orchestration here only starts, watches and stops things; every figure of the
report comes from `report.py`/`baseline.py` (pure), every process is stopped on the way out (Ctrl-C
included), and the run checks that no process it started survives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil
import psycopg
from psycopg import sql

from aibot import db
from aibot.cli.render import is_plain
from aibot.cluster import demand, sizing
from aibot.cluster import state as cluster_state
from aibot.db import migrate
from aibot.demo import baseline, capacity, report
from aibot.demo.embedded import DEMO_DATABASE, EmbeddedError, EmbeddedPostgres, default_pgdata
from aibot.demo.progress import Display, ServerLine, Snapshot, replies_per_minute
from aibot.ops import inspection
from aibot.settings import redact_url
from aibot.demo.users import (DEMO_ENTITIES, Poster, WorkloadError, demo_entity_configs, message_count,
                              plan_messages)
from aibot.harness import FAST_SCHEDULES, Stack, write_config
from aibot.settings import Settings
from aibot.sim import SimCluster
from aibot.sim.chat import FakeChatServer
from aibot.sim.cluster import seed_spec

queries = db.Queries(__name__)


class DemoError(RuntimeError):
    """The demo cannot run; the message says why and what to do."""


@dataclass
class DemoOptions:
    duration: float = 60.0            # simulated seconds of posting (wall clock: duration × speed)
    messages: int | None = None       # default: 2.5 per simulated second
    seed: int = 1
    speed: float = 1.0
    keep_db: bool = False
    keep_logs: bool = False
    json_path: str | None = None
    database_url: str | None = None
    drain_timeout: float | None = None   # wall seconds after posting ends; default 60 + 600 × speed
    interval: float = 1.0             # progress refresh (wall seconds)

    def validate(self) -> None:
        if not self.speed > 0:
            raise DemoError(f"--speed must be > 0, got {self.speed!r}")
        if not self.interval > 0:
            raise DemoError(f"--interval must be > 0 seconds, got {self.interval!r}")
        if self.drain_timeout is not None and not self.drain_timeout > 0:
            raise DemoError(f"--drain-timeout must be > 0 seconds, got {self.drain_timeout!r}")
        try:
            message_count(self.messages, self.duration)
        except WorkloadError as exc:
            raise DemoError(str(exc)) from None

    @property
    def drain_seconds(self) -> float:
        return self.drain_timeout if self.drain_timeout is not None else 60.0 + 600.0 * self.speed


# ------------------------------------------------------------------------------------------ signals

class Interrupts:
    """First Ctrl-C: stop posting and drain. Second Ctrl-C or SIGTERM: stop now. Handlers only set
    flags, so clean-up code is never interrupted half way."""

    def __init__(self) -> None:
        self.stop_posting = threading.Event()
        self.abort = threading.Event()
        self.wake = threading.Event()
        self.count = 0
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in ((signal.SIGINT, self._on_int), (signal.SIGTERM, self._on_term)):
                self._saved[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _on_int(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            self.stop_posting.set()
        elif self.count == 2:
            self.abort.set()
        else:
            raise KeyboardInterrupt
        self.wake.set()

    def _on_term(self, signum, frame) -> None:
        self.abort.set()
        self.wake.set()


# ----------------------------------------------------------------------------------------- database

@dataclass
class DemoDatabase:
    url: str
    kind: str                          # "external" | "embedded"
    info: dict[str, Any] = field(default_factory=dict)


def _sql_with_database(name: str, database: str) -> sql.Composed:
    return sql.SQL(queries.sql(name)).format(database=sql.Identifier(database))


@contextlib.contextmanager
def open_database(opts: DemoOptions, environ: Mapping[str, str], say: Callable[[str], None]) -> Iterator[DemoDatabase]:
    """The user's database if one is named (it must hold no aibot jobs or servers), else an embedded
    PostgreSQL in the user's data directory. Never falls back to a server that merely happens to run."""
    url = opts.database_url or Settings.from_sources(environ).database_url
    if url:
        origin = "--database-url" if opts.database_url else "AIBOT_DATABASE_URL"
        say(f"Database: {redact_url(url)} (from {origin})")
        try:
            conn = db.connect(url, autocommit=True)
        except Exception as exc:  # noqa: BLE001 - any connection failure is the user's to fix
            raise DemoError(f"cannot connect to {origin} {redact_url(url)}: {exc}") from None
        with conn:
            if not queries.one(conn, "demo_lock")["locked"]:
                raise DemoError(f"another aibot demo is using {redact_url(url)}")
            if queries.one(conn, "demo_schema_present")["present"]:
                rows = queries.one(conn, "demo_existing_rows")
                if rows["jobs"] or rows["servers"]:
                    raise DemoError(
                        f"{redact_url(url)} already holds {rows['jobs']} job(s) and {rows['servers']} server(s); "
                        "the demo needs an empty database so it cannot disturb a deployment: create one "
                        "(e.g. createdb aibot_demo) and point AIBOT_DATABASE_URL at it, or unset "
                        "AIBOT_DATABASE_URL to use an embedded PostgreSQL")
            yield DemoDatabase(url, "external", {"url": redact_url(url), "origin": origin})
        return

    pgdata = default_pgdata(environ, os.geteuid() if hasattr(os, "geteuid") else 1, Path.home())
    say(f"Database: AIBOT_DATABASE_URL is not set, so the demo starts an embedded PostgreSQL (pgserver) in "
        f"{pgdata} (Unix socket only, no TCP port; stopped when the demo ends)")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        say("  running as root: pgserver runs postgres as the system user 'pgserver' (created if missing) and "
            "adds read/execute for others on the data directory's parents (docs/demo.md)")
    emb = EmbeddedPostgres(pgdata)
    info: dict[str, Any] = {"pgdata": str(pgdata)}
    try:
        try:
            admin_url = emb.start()
        except EmbeddedError as exc:
            raise DemoError(str(exc)) from None
        info["postmaster_pid"] = emb.pid
        with db.connect(admin_url, autocommit=True) as admin:
            if not queries.one(admin, "demo_lock")["locked"]:
                raise DemoError(f"another aibot demo is running on the embedded PostgreSQL in {pgdata}")
            admin.execute(_sql_with_database("demo_drop_database", DEMO_DATABASE))
            admin.execute(_sql_with_database("demo_create_database", DEMO_DATABASE))
            url = emb.url(DEMO_DATABASE)
            info["url"] = url
            try:
                yield DemoDatabase(url, "embedded", info)
            finally:
                if not opts.keep_db:
                    admin.execute(_sql_with_database("demo_drop_database", DEMO_DATABASE))
    finally:
        emb.stop()
        info["stopped"] = not emb.running()


# ---------------------------------------------------------------------------------------- processes

@dataclass
class ProcessWatch:
    """Every descendant ever seen (pid, create time), so the end of the run can prove none survived."""

    seen: dict[int, float] = field(default_factory=dict)

    def sample(self) -> None:
        try:
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass

    def survivors(self) -> list[int]:
        alive = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive

    def kill_survivors(self) -> list[int]:
        left = self.survivors()
        for pid in left:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        return left


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Recording:
    posted: list = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    replies: list[dict] = field(default_factory=list)
    sim_stats: dict[str, dict] = field(default_factory=dict)
    samples: list[report.SlotSample] = field(default_factory=list)
    outcome: str = "drained"          # drained | interrupted | aborted | timed out | failed
    error: str | None = None


def _snapshot(conn, sims: SimCluster, chat: FakeChatServer, *, started: float, elapsed: float, phase: str,
              posted: int, planned: int) -> tuple[Snapshot, int]:
    rows = queries.all(conn, "demo_job_states")
    states = {r["state"]: r["jobs"] for r in rows}
    runnable = sum(r["runnable"] for r in rows)
    usage: dict[str, list[int]] = {}
    for r in inspection.slot_usage(conn):
        u = usage.setdefault(r["server"], [0, 0])
        u[0] += int(r["slots_used"])
        u[1] += int(r["slots_total"])
    lines = []
    for name, st in sims.stats().items():
        models = st["models"]
        lines.append(ServerLine(
            name=name, in_flight={m: c["in_flight"] for m, c in models.items()},
            slots_used=usage.get(name, [0, 0])[0], slots_total=usage.get(name, [0, 0])[1],
            ram_used=st["memory"]["used_bytes"], ram_budget=st["memory"]["budget_bytes"],
            loads=sum(c["loads"] for c in models.values()),
            loading=sum(c["loading_instances"] for c in models.values())))
    now = time.time()
    reply_times = [m["timestamp"] / 1000 for m in chat.replies()]
    unplaced = tuple((r["model"], int(r["queued"])) for r in cluster_state.unplaced_demand(conn))
    snap = Snapshot(elapsed, phase, posted, planned, states, runnable, len(reply_times),
                    replies_per_minute(reply_times, now, started), tuple(lines), unplaced)
    per_model: dict[str, int] = {}
    held: dict[str, int] = {}
    for c in cluster_state.slot_counts(conn):
        per_model[c["model"]] = per_model.get(c["model"], 0) + c["free"] + c["held"]
        held[c["model"]] = held.get(c["model"], 0) + c["held"]
    wanted = cluster_state.model_demand(conn)
    idle = demand.stranded(cluster_state.server_views(conn), wanted, per_model)
    servable = sum(min(n, held.get(m, 0) + (wanted[m].queued if m in wanted else 0)) for m, n in per_model.items())
    return snap, report.SlotSample(now, sum(u[1] for u in usage.values()), sum(u[0] for u in usage.values()),
                                   runnable, len(idle), servable)


def _drained(conn, posted_ids: list[str]) -> bool:
    row = queries.one(conn, "demo_message_states", {"ids": posted_ids})
    return row["messages"] == len(posted_ids) and row["finished"] == row["jobs"]


def run_demo(opts: DemoOptions, *, out: TextIO | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Runs the demo and prints the report; returns the exit status (0 = every message answered once)."""
    opts.validate()
    out = out or sys.stdout
    environ = os.environ if environ is None else environ
    display = Display(out, tty=not is_plain(out))
    say = display.say
    count = message_count(opts.messages, opts.duration)
    plan = plan_messages(opts.seed, count, opts.duration)
    rec = Recording()
    watch = ProcessWatch()
    ctx: dict[str, Any] = {"duration_simulated_seconds": opts.duration, "messages": count, "seed": opts.seed,
                           "speed": opts.speed}
    workdir = Path(tempfile.mkdtemp(prefix="aibot-demo-"))
    keep_logs = opts.keep_logs
    sim_configs = []
    with Interrupts() as intr:
        try:
            with contextlib.ExitStack() as es:
                database = es.enter_context(open_database(opts, environ, say))
                database.info["kind"] = database.kind
                ctx["database"] = database.info      # the same dict: open_database adds "stopped" on exit
                applied = migrate.migrate(database.url)
                say(f"Migrated: {len(applied)} migration(s) applied" if applied else "Migrated: schema up to date")

                spec = seed_spec(speed=opts.speed)
                sims = es.enter_context(SimCluster(spec))
                sim_configs = [s.config for s in sims.servers]
                chat = es.enter_context(FakeChatServer(seed=opts.seed))
                for s in sims.servers:
                    c, timing = s.config, baseline.Timing.from_sim_config(s.config)
                    say(f"Simulated {s.name} at {s.url}: {c.memory_bytes / 1e9:.0f} GB RAM, {len(c.models)} models × "
                        f"{c.models[0].size_bytes / 1e9:.0f} GB (f16), parallel {c.parallel}, cold load "
                        f"{report.secs(timing.load_seconds(c.models[0].size_bytes))}, reply "
                        f"≈{report.secs(timing.service_seconds(40, c.reply_tokens))} alone")
                say(f"Fake chat server at {chat.url}; {count} messages from {len(set(m.username for m in plan))} users "
                    f"to {len(DEMO_ENTITIES)} entities over {opts.duration * opts.speed:.1f}s (seed {opts.seed})")

                servers = [{"name": s.name, "url": s.url, "kind": "lmstudio", "enabled": True,
                            "capabilities": {"maxMemory": s.config.memory_bytes / 1e9}} for s in sims.servers]
                config_path = write_config(workdir / "config-aientities.json", servers=servers,
                                           entities=demo_entity_configs())
                choice = capacity.choose_workers([
                    capacity.server_ceiling(s.name, sizing.Budget(s.config.memory_bytes),
                                            [m.size_bytes for m in s.config.models], s.config.parallel or 1)
                    for s in sims.servers])
                say(f"Workers: {choice.explain()}")
                ctx["workers"] = {"processes": choice.processes, "threads": choice.threads,
                                  "total_slots_ceiling": choice.total_slots, "command": choice.command}

                stack = Stack(database.url, config_path, workdir=workdir / "logs", env={
                    **FAST_SCHEDULES,
                    "AIBOT_CHAT_API_URL": chat.url, "AIBOT_CHAT_API_TOKEN": "", "AIBOT_SINK": "chat",
                    "AIBOT_BROKER_URL": database.url, "AIBOT_SETTINGS_FILE": "", "AIBOT_SHUTDOWN_TIMEOUT": "5",
                })
                es.callback(stack.stop)
                es.callback(watch.sample)          # runs before stack.stop: catch the latest children
                stack.start_bot()
                stack.start_workers(processes=choice.processes, threads=choice.threads, shutdown_timeout_ms=10_000)
                say(f"Started `aibot bot` (with scheduler) and `{choice.command}`; logs in {workdir / 'logs'} "
                    + ("(kept)" if opts.keep_logs else "(deleted at the end unless the run fails; --keep-logs keeps them)"))
                say("Ctrl-C once: stop posting, drain and report. Twice: stop now.\n")

                try:
                    _watch_run(opts, plan, rec, watch, intr, display, database, sims, chat, stack)
                except Exception as exc:  # noqa: BLE001 - report what was done, then fail
                    rec.outcome, rec.error = "failed", f"{type(exc).__name__}: {exc}"
                    say(f"demo failed: {rec.error}")
                if rec.outcome in ("timed out", "failed"):
                    keep_logs = True
                    say(f"Logs kept in {workdir / 'logs'}")
                _collect(rec, database, chat, sims, say)
        except DemoError:
            raise
        except Exception as exc:
            keep_logs = True
            rec.outcome, rec.error = "failed", f"{type(exc).__name__}: {exc}"
            say(f"demo failed: {rec.error}; logs in {workdir / 'logs'}")
        finally:
            left = watch.kill_survivors()
            ctx["processes"] = {"started": sorted(watch.seen), "left_running": left}
            display.close()
            if not keep_logs:
                shutil.rmtree(workdir, ignore_errors=True)
            elif rec.outcome not in ("timed out", "failed"):
                say(f"Logs kept in {workdir / 'logs'}")

    if not rec.sim_stats:
        return 1
    result = compose_report(opts, plan, rec, sim_configs, ctx)
    say("")
    say(report.format_report(result))
    if opts.json_path:
        Path(opts.json_path).write_text(report.to_json(result))
        say(f"\nReport written to {opts.json_path}")
    if rec.outcome == "aborted":
        return 130
    ok = result.all_answered_exactly_once and rec.outcome in ("drained", "interrupted")
    return 0 if ok and not ctx["processes"]["left_running"] else 1


class Monitor:
    """The demo's own database connection for progress queries. A lost connection (the server restarted,
    an operator killed it) is reopened on the next tick instead of ending the demo; the processes under
    test have their own retry logic, and the demo must not be the one that gives up first."""

    def __init__(self, url: str, say: Callable[[str], None], give_up_after: float = 60.0):
        self.url = url
        self.say = say
        self.give_up_after = give_up_after
        self.conn = None
        self.lost_since: float | None = None

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(conn)`, or None when the database cannot be reached right now."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = db.connect(self.url, autocommit=True)
                if self.lost_since is not None:
                    self.say("Database connection restored.")
                self.lost_since = None
            return fn(self.conn)
        except psycopg.OperationalError as exc:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
            now = time.monotonic()
            if self.lost_since is None:
                self.lost_since = now
                self.say(f"Database connection lost ({str(exc).strip().splitlines()[0]}); retrying.")
            elif now - self.lost_since > self.give_up_after:
                raise RuntimeError(f"database unreachable for {self.give_up_after:.0f}s: {exc}") from None
            return None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


def _watch_run(opts, plan, rec: Recording, watch: ProcessWatch, intr: Interrupts, display: Display,
               database: DemoDatabase, sims: SimCluster, chat: FakeChatServer, stack: Stack) -> None:
    stop_posting = threading.Event()
    poster = Poster(plan, chat.post_human, speed=opts.speed, stop=stop_posting)
    monitor = Monitor(database.url, display.say)
    tick = min(0.2, opts.interval)
    t0 = time.monotonic()
    started = time.time()
    poster.start()
    phase = "posting"
    drain_deadline = 0.0
    next_show = time.monotonic()

    def snapshot(conn, phase: str):
        return _snapshot(conn, sims, chat, started=started, elapsed=time.monotonic() - t0, phase=phase,
                         posted=len(poster.posted), planned=len(plan))
    try:
        while True:
            now = time.monotonic()
            watch.sample()
            got = monitor.run(lambda conn: snapshot(conn, phase))
            if got is not None:
                snap, sample = got
                rec.samples.append(sample)
                if now >= next_show:
                    display.show(snap)
                    next_show = max(next_show + opts.interval, now)
            dead = [p for p in stack.procs if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with status {dead[0].popen.returncode}:\n"
                                   f"{dead[0].log()[-3000:]}")
            if poster.error is not None:
                raise RuntimeError(f"posting failed: {poster.error!r}")
            if intr.abort.is_set():
                rec.outcome = "aborted"
                display.say("Stopping now (second Ctrl-C or SIGTERM).")
                return
            if phase == "posting" and intr.stop_posting.is_set():
                stop_posting.set()
                poster.join()
                rec.outcome = "interrupted"
                display.say(f"Ctrl-C: stopped posting after {len(poster.posted)} of {len(plan)} messages; "
                            "draining (Ctrl-C again to stop now).")
            if phase == "posting" and not poster.is_alive():
                phase = "draining"
                drain_deadline = now + opts.drain_seconds
            if phase == "draining":
                ids = [p.id for p in poster.posted]
                if monitor.run(lambda conn: _drained(conn, ids)):
                    final = monitor.run(lambda conn: snapshot(conn, "drained"))
                    if final is not None:
                        display.show(final[0])
                    return
                if now > drain_deadline:
                    rec.outcome = "timed out"
                    display.say(f"Drain timed out after {opts.drain_seconds:.0f}s; reporting what was answered.")
                    return
            intr.wake.wait(tick)
            intr.wake.clear()
    finally:
        monitor.close()
        stop_posting.set()
        poster.join(10)
        rec.posted = poster.posted


def _collect(rec: Recording, database: DemoDatabase, chat: FakeChatServer, sims: SimCluster,
             say: Callable[[str], None]) -> None:
    """What the report is computed from; each source on its own, so a failure in one keeps the others."""
    rec.replies = chat.replies()
    rec.sim_stats = sims.stats()
    deadline = time.monotonic() + 30
    while True:
        try:
            with db.connect(database.url, autocommit=True) as conn:
                rec.jobs = queries.all(conn, "demo_jobs")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                say(f"cannot read the jobs table for the report: {exc}")
                return
            time.sleep(1.0)   # a retry interval for a restarting server, not synchronisation


def compose_report(opts: DemoOptions, plan, rec: Recording, sim_configs, ctx: dict) -> report.Report:
    """Turns the recording into report records, computes the baseline, and builds the report."""
    posted = [report.PostRecord(p.id, p.entity, p.timestamp_ms) for p in rec.posted]
    post_ts = {p.id: p.timestamp_ms / 1000 for p in rec.posted}
    jobs = [report.JobRecord(j["id"], j["source_message_id"], j["entity_id"], j["model"], j["state"], j["priority"],
                             j["created_at"], j["claimed_at"], j["finished_at"], j["server"], j["attempts"])
            for j in rec.jobs]
    replies = [report.ReplyRecord(str(m.get("replyTo")), int(m["timestamp"])) for m in rec.replies]
    servers = []
    for cfg in sim_configs:
        st = rec.sim_stats.get(cfg.name, {})
        servers.append(report.ServerRecord(cfg.name, cfg.parallel or 1, st["memory"]["budget_bytes"],
                                           st["memory"]["peak_bytes"],
                                           {m: c["loads"] for m, c in st["models"].items()},
                                           st["server"]["peak_in_flight"],
                                           sum(c.get("loading_instances", 0) for c in st["models"].values())))
    runs = []
    if sim_configs:
        timing = baseline.Timing.from_sim_config(sim_configs[0])
        prompts = {e["id"]: (e["systemPrompt"], e["userPrompt"]) for e in demo_entity_configs()}
        seq = []
        for j in rec.jobs:
            if j["state"] != "done" or j["source_message_id"] not in post_ts or not j["reply_text"]:
                continue
            pay = j["payload"] or {}
            system, user = prompts.get(j["entity_id"], ("", ""))
            pt = baseline.original_prompt_tokens(system, user, pay.get("context") or [], pay.get("username", ""),
                                                 pay.get("text", ""))
            seq.append(baseline.SeqJob(post_ts[j["source_message_id"]], j["priority"], j["model"],
                                       timing.service_seconds(pt, baseline.reply_tokens(j["reply_text"]))))
        sizes = {m.key: m.size_bytes for m in sim_configs[0].models}
        load_time = {m: timing.load_seconds(sizes.get(m, 15 * 10**9)) for m in {s.model for s in seq}}
        runs = [baseline.simulate_sequential(seq, load_time, policy=p) for p in baseline.POLICIES]
    ctx = {**ctx, "outcome": rec.outcome}
    if rec.error:
        ctx["error"] = rec.error
    result = report.build_report(posted=posted, jobs=jobs, replies=replies, servers=servers, samples=rec.samples,
                                 baseline=runs, speed=opts.speed, seed=opts.seed, context=ctx)
    if rec.outcome != "drained":
        result.notes.append(f"run {rec.outcome}: figures cover what was posted and answered until then")
    if ctx.get("processes", {}).get("left_running"):
        result.notes.append(f"processes left running (killed): {ctx['processes']['left_running']}")
    db_info = ctx.get("database", {})
    if db_info.get("kind") == "embedded" and not db_info.get("stopped", True):
        result.notes.append(f"the embedded PostgreSQL (pid {db_info.get('postmaster_pid')}) did not stop")
    return result
