"""A chaos run: real `aibot bot`/`aibot scheduler`/`dramatiq aibot.actors` processes, simulated LLM
servers and the fake chat server, hurt on a seeded schedule while messages flow.

Shape of a run (the short CI variant and `bench/chaos.py` share it; only the sizes differ):
- two bots (one with the in-process scheduler) and a separate `aibot scheduler`: two of each;
- two worker hosts, "a" and "b", each an `aibot worker --processes 2` (one Dramatiq master per
  process: a killed process is replaced while its sibling keeps working); a supervisor loop restarts a
  host that exited (as systemd's Restart=always would);
- LLM servers answering 5xx, HTML error pages, malformed JSON, empty choices, truncated bodies and
  answers slower than the worker's read timeout; the chat sink failing posts before and after storing;
- on the schedule (`tests.chaos.schedule.make_schedule`): kill -9 of worker processes mid-generation
  and of a whole master, SIGTERM of a master with work in flight, pg_terminate_backend of every
  session while claims and completions are in flight, a PostgreSQL restart (local cluster only) and
  a server outage.
Then the faults stop, the run waits until every job has ended, and `verdict` checks the promises:
also that no reply id was posted with two bodies (the chat logs every post, as a sink that does not
deduplicate would keep them) and that no process log holds an unhandled traceback. Recovery times
(a killed worker's jobs back and answered, a host's reply rate after a child's kill, the first reply
from a server after its outage) are measured and reported.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from aibot import db
from aibot.harness import FAST_SCHEDULES, Proc, Stack, entity, write_config
from aibot.sim import SimCluster
from aibot.sim.chat import FakeChatServer
from aibot.sim.cluster import seed_spec
from aibot.sim.faults import FaultConfig
from tests.chaos.schedule import (KILL_MASTER, KILL_WORKER, MASTERS, RESTART_POSTGRES, SERVER_OUTAGE,
                                  TERM_MASTER, TERMINATE_BACKENDS, Event, Observed, count_tracebacks, make_schedule,
                                  sink_repeats, verdict)

PG_CLUSTER = ("15", "main")


def local_cluster_restartable(db_url: str) -> bool:
    """Restarting PostgreSQL is only done to the machine's own cluster, never to a remote server or a
    container the test did not start: the URL must point at 127.0.0.1:5432 and pg_ctlcluster must exist.
    `AIBOT_CHAOS_PG_RESTART=0` opts out (other people's tests share that cluster)."""
    if os.environ.get("AIBOT_CHAOS_PG_RESTART", "1").strip().lower() in ("0", "no", "false", "off"):
        return False
    parts = urlsplit(db_url)
    if parts.hostname not in ("127.0.0.1", "localhost") or (parts.port or 5432) != 5432:
        return False
    return shutil.which("pg_ctlcluster") is not None and Path(f"/etc/postgresql/{PG_CLUSTER[0]}/{PG_CLUSTER[1]}").is_dir()


@dataclass
class ChaosConfig:
    messages: int = 150
    seed: int = 1
    feed_seconds: float = 40.0          # messages are posted over this long; the schedule spans it
    outage_seconds: float = 8.0
    speed: float = 0.1                  # simulator time scale: ~3 s per cold load
    per_token_seconds: float = 0.1      # with speed 0.1 and 110 tokens: ~1.1 s per reply, so kills land mid-generation
    lease_seconds: int | None = 6       # None: the deployment default (AIBOT_LEASE_SECONDS unset, 30 s)
    read_timeout: float = 1.5           # worker's backend read timeout; slow answers take longer
    error_rate: float = 0.10            # HTTP 5xx
    html_rate: float = 0.02
    malformed_rate: float = 0.02
    empty_choices_rate: float = 0.01
    truncated_rate: float = 0.02
    slow_rate: float = 0.02
    post_failure_rate: float = 0.20    # chat sink answers 500 before storing
    post_ack_loss_rate: float = 0.05   # ... and after storing (the reply is there, the ack is lost)
    bad_message_rate: float = 0.04     # messages the bot must reject (unknown entity, huge text, bad ais)
    worker_kills: int = 3
    master_kills: int = 1
    terms: int = 1
    backend_kills: int = 1
    pg_restart: bool | None = None      # None: when local_cluster_restartable()
    quiesce_timeout: float = 150.0
    threads: int = 4

    @property
    def lease_margin(self) -> float:
        """How long past its lease a running job may be seen: the reclaim tick (1 s) plus a database
        restart and a slow tick."""
        return 10.0


@dataclass
class ChaosResult:
    config: dict
    schedule: list[dict]
    events: list[dict]
    counts: dict
    violations: list[str]
    faults: dict
    chat: dict
    loads: dict
    peaks: list
    max_lease_overdue: float
    timings: dict
    job_states: dict
    errors: list[str] = field(default_factory=list)
    sink: dict = field(default_factory=dict)        # what a non-deduplicating sink would have shown
    tracebacks: dict = field(default_factory=dict)  # process log -> unhandled tracebacks
    recovery: dict = field(default_factory=dict)    # measured recovery times (see `_recovery`)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"messages {c.get('messages', 0)}: answered once {c.get('answered_once', 0)}, "
            f"rejected {c.get('rejected', 0)}, dead {c.get('dead', 0)}, skipped {c.get('skipped', 0)}; "
            f"replies at chat {c.get('replies', 0)}",
            f"job states: {self.job_states}",
            f"faults injected at the LLM servers: {self.faults}",
            f"chat: {self.chat}",
            f"model loads: {self.loads}",
            f"max lease overdue seen: {self.max_lease_overdue:.1f}s; timings: {self.timings}",
            f"non-deduplicating sink: {self.sink}; tracebacks: {self.tracebacks or 0}",
            f"recovery: {self.recovery}",
        ]
        lines += [f"event {e['at']:>6.1f}s {e['kind']} {e.get('target', '')}: {e.get('detail', '')}" for e in self.events]
        lines += [f"VIOLATION: {v}" for v in self.violations] + [f"ERROR: {e}" for e in self.errors]
        return "\n".join(lines)


class Master:
    """One `dramatiq aibot.actors` master under a name ("a"/"b"); each restart is a new generation with
    its own worker name, so the jobs a dead generation held can be told apart from its successor's."""

    def __init__(self, run: ChaosRun, name: str):
        self.run, self.name = run, name
        self.generation = 0
        self.proc: Proc | None = None
        self.expected_exit = threading.Event()
        self.lock = threading.Lock()

    @property
    def worker_name(self) -> str:
        return f"chaos-{self.name}{self.generation}"

    def start(self) -> None:
        with self.lock:
            self.generation += 1
            self.proc = self.run.stack.spawn(self.worker_name, [
                sys.executable, "-m", "aibot", "worker", "--processes", "2", "--threads", str(self.run.cfg.threads)],
                {"AIBOT_WORKER_NAME": self.worker_name})
            self.expected_exit.clear()

    def worker_pids(self) -> list[int]:
        rows = self.run.query("SELECT pid FROM aibot.workers WHERE worker_id LIKE %s", (self.worker_name + ":%",))
        return [r["pid"] for r in rows]

    def running_jobs(self) -> list[dict]:
        return self.run.query(
            "SELECT id, worker_id, reply IS NOT NULL AS has_reply FROM aibot.jobs "
            "WHERE state = 'running' AND worker_id LIKE %s", (self.worker_name + ":%",))


class ChaosRun:
    def __init__(self, db_url: str, workdir: Path, cfg: ChaosConfig | None = None, *, log=print):
        self.db_url = db_url
        self.workdir = Path(workdir)
        self.cfg = cfg or ChaosConfig()
        self.log = log
        self.rng = random.Random(self.cfg.seed)
        self.pg_restart = local_cluster_restartable(db_url) if self.cfg.pg_restart is None else self.cfg.pg_restart
        self.events: list[dict] = []
        self.errors: list[str] = []
        self.posted: list[dict] = []
        self.left_running_after_term: list[dict] = []
        self.max_overdue = 0.0
        self.peak_sessions = 0
        self.peak_instances: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._t0 = 0.0

    # --- database helpers (tolerate the database being away) ---------------------------------------

    def query(self, sql: str, params=None, *, retry_for: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + retry_for
        while True:
            try:
                with db.connect(self.db_url, autocommit=True, connect_timeout=3) as conn:
                    return conn.execute(sql, params or ()).fetchall()
            except psycopg.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def scalar(self, sql: str, params=None):
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def note(self, kind: str, target: str = "", **detail) -> None:
        entry = {"at": round(self.elapsed(), 2), "kind": kind, "target": target, "detail": detail}
        self.events.append(entry)
        self.log(f"[chaos {entry['at']:6.1f}s] {kind} {target} {detail}")

    # --- the run -------------------------------------------------------------------------------------

    def run(self) -> ChaosResult:
        cfg = self.cfg
        spec = seed_spec(speed=cfg.speed, parallel=(1, 4), memory_gb=128, seed=cfg.seed,
                         per_token_seconds=cfg.per_token_seconds)
        timings: dict[str, float] = {}
        started = time.monotonic()
        with SimCluster(spec) as sims, FakeChatServer(seed=cfg.seed) as chat:
            self.sims, self.chat = sims, chat
            servers = [{"name": s.name, "url": s.url, "kind": "lmstudio", "enabled": True,
                        "capabilities": {"maxMemory": 128}} for s in sims.servers]
            ents = [entity(f"e{i}", f"sim/model-{i}@f16", maxTokens=200) for i in range(1, 7)]
            config_path = write_config(self.workdir / "config.json", servers=servers, entities=ents)
            self.stack = Stack(self.db_url, config_path, workdir=self.workdir / "logs", env={
                **FAST_SCHEDULES,
                "AIBOT_CHAT_API_URL": chat.url,
                "AIBOT_SINK": "chat",
                **({"AIBOT_LEASE_SECONDS": str(cfg.lease_seconds)} if cfg.lease_seconds else {}),
                "AIBOT_SHUTDOWN_TIMEOUT": "5",
                "AIBOT_BACKEND_READ_TIMEOUT": str(cfg.read_timeout),
                "AIBOT_INVOCATION_BUDGET_SECONDS": "10",
                "AIBOT_WORKER_POOL": "6",
            })
            self.masters = {name: Master(self, name) for name in MASTERS}
            schedule = make_schedule(cfg.seed, duration=cfg.feed_seconds, servers=[s.name for s in sims.servers],
                                     outage_seconds=cfg.outage_seconds, worker_kills=cfg.worker_kills,
                                     master_kills=cfg.master_kills, terms=cfg.terms,
                                     backend_kills=cfg.backend_kills, pg_restarts=1 if self.pg_restart else 0)
            try:
                self._set_faults(on=True)
                self.stack.start_bot("bot-1")
                self.stack.start_bot("bot-2", args=("--no-scheduler",))
                self.stack.start_scheduler("scheduler-2")
                for m in self.masters.values():
                    m.start()
                self._wait_registered()
                self._t0 = time.monotonic()
                threads = [threading.Thread(target=self._guard(self._feed), name="chaos-feed", daemon=True),
                           threading.Thread(target=self._guard(self._monitor), name="chaos-monitor", daemon=True),
                           threading.Thread(target=self._guard(self._supervise), name="chaos-supervisor", daemon=True)]
                for t in threads:
                    t.start()
                self._play(schedule)
                threads[0].join(cfg.feed_seconds + 60)
                timings["chaos_s"] = round(self.elapsed(), 1)
                self._set_faults(on=False)
                self.note("faults_cleared")
                self._wait_quiet()
                timings["quiet_s"] = round(self.elapsed(), 1)
                self._stop.set()
                for t in threads[1:]:
                    t.join(10)
                result = self._collect(schedule, timings)
            finally:
                self._stop.set()
                self.stack.stop(timeout=30)
                self.stack_logs = self.stack.logs()
                result_tracebacks = count_tracebacks({f"{p.name} (pid {p.pid})": p.log() for p in self.stack.procs})
        result.tracebacks = result_tracebacks
        worst, bound = result.recovery.get("worst_kill_back_s"), self._lease() + self.cfg.lease_margin
        if worst is not None and worst > bound:
            result.violations.append(f"a killed worker's jobs took {worst:.1f}s to come back "
                                     f"(> lease {self._lease():.0f}s + margin {self.cfg.lease_margin:.0f}s)")
        if result_tracebacks:
            result.violations.extend(f"{n} unhandled traceback(s) in the log of {name}"
                                     for name, n in sorted(result_tracebacks.items()))
        result.timings["total_s"] = round(time.monotonic() - started, 1)
        result.errors.extend(self._leftover_processes())
        return result

    def _wait_registered(self, timeout: float = 60.0) -> None:
        """Traffic and the schedule start once every host's two worker processes are up, so the first
        kill finds a process to kill (on a loaded 2-core machine start-up takes several seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(m.worker_pids()) >= 2 for m in self.masters.values()):
                return
            time.sleep(0.2)
        self.errors.append(f"worker processes not all registered within {timeout:.0f}s")

    def _guard(self, fn):
        def wrapped():
            try:
                fn()
            except Exception:
                self.errors.append(f"{fn.__name__}: {traceback.format_exc(limit=5)}")
        return wrapped

    def _set_faults(self, *, on: bool) -> None:
        cfg = self.cfg
        for s in self.sims.servers:
            if on:
                s.set_faults(FaultConfig(error_rate=cfg.error_rate, html_rate=cfg.html_rate,
                                         malformed_rate=cfg.malformed_rate, empty_choices_rate=cfg.empty_choices_rate,
                                         truncated_rate=cfg.truncated_rate, slow_rate=cfg.slow_rate,
                                         slow_seconds=cfg.read_timeout + 1.5))
            else:
                s.clear_faults()
        self.chat.set_faults(post_failure_rate=cfg.post_failure_rate if on else 0.0,
                             post_ack_loss_rate=cfg.post_ack_loss_rate if on else 0.0)

    # --- traffic -------------------------------------------------------------------------------------

    def _feed(self) -> None:
        """Posts the messages at a steady seeded pace; a few are bad input the bot must reject."""
        cfg, rng = self.cfg, random.Random(self.cfg.seed + 7)
        interval = cfg.feed_seconds / max(1, cfg.messages)
        for i in range(cfg.messages):
            due = self._t0 + i * interval
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            ent = f"e{rng.randrange(1, 7)}"
            if rng.random() < cfg.bad_message_rate:
                bad = rng.choice(("unknown_entity", "huge_text", "bad_ais"))
                if bad == "unknown_entity":
                    msg = self.chat.post_human(f"who is there {i}", entity="nobody-here")
                elif bad == "huge_text":
                    msg = self.chat.post_human("x" * 20_000, entity=ent)
                else:
                    msg = self.chat.post_human(f"hi {i}", entity=ent, ais="Name:999999999")
                self.posted.append({"id": msg["id"], "expect": "reject", "bad": bad})
                continue
            # Hostile-looking but valid text, out-of-range priorities (ignored, still answered) and unicode.
            text = rng.choice([f"hello {i}", f"'); DROP TABLE aibot.jobs; -- {i}", f"héllo wörld ✓ {i} 🤖",
                               f"question {i}?"])
            priority = rng.choice([0, 5, 50, 99, 500, -3, "7", None])
            msg = self.chat.post_human(text, entity=ent, priority=priority, username=f"user{i % 17}")
            self.posted.append({"id": msg["id"], "expect": "answer"})

    # --- watching --------------------------------------------------------------------------------

    def _monitor(self) -> None:
        """Samples how far past its lease any running job is; the reclaim tick should keep this small."""
        while not self._stop.wait(0.5):
            try:
                with db.connect(self.db_url, autocommit=True, connect_timeout=2) as conn:
                    row = conn.execute(
                        "SELECT coalesce(max(extract(epoch FROM now() - lease_expires_at)), 0)::float AS overdue "
                        "FROM aibot.jobs WHERE state = 'running'").fetchone()
                    sessions = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                                            "WHERE datname = current_database()").fetchone()["n"]
                self.max_overdue = max(self.max_overdue, row["overdue"])
                self._sample_instances()
                self.peak_sessions = max(self.peak_sessions, sessions)
            except psycopg.OperationalError:
                continue   # the database is restarting: that is the point

    def _sample_instances(self) -> None:
        """Most instances (loading or loaded) of one model on one simulated server seen at once."""
        for server in self.sims.servers:
            seen = Counter(i.key for i in server.engine.instances())
            for key, n in seen.items():
                k = (server.name, key)
                self.peak_instances[k] = max(self.peak_instances.get(k, 0), n)

    def _supervise(self) -> None:
        """Restarts a master that exited on its own (a killed worker process takes its master down)."""
        while not self._stop.wait(0.3):
            for m in self.masters.values():
                with m.lock:
                    dead = m.proc is not None and not m.proc.alive() and not m.expected_exit.is_set()
                    rc = m.proc.popen.returncode if dead else None
                if dead:
                    self.note("master_exited", m.name, generation=m.generation, returncode=rc, restarted=True)
                    m.start()

    # --- events ------------------------------------------------------------------------------------

    def _play(self, schedule: list[Event]) -> None:
        for ev in schedule:
            wait = self._t0 + ev.at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            try:
                getattr(self, f"_do_{ev.kind}")(ev)
            except Exception:
                self.errors.append(f"event {ev}: {traceback.format_exc(limit=5)}")

    def _wait_busy(self, m: Master, timeout: float = 4.0) -> list[dict]:
        """Waits (briefly) for the master to hold jobs still generating, so a kill lands mid-generation."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in m.running_jobs() if not j["has_reply"]]
            if jobs:
                return jobs
            time.sleep(0.05)
        return []

    def _do_kill_worker(self, ev: Event) -> None:
        m = self.masters[ev.target]
        busy = self._wait_busy(m)
        pids = sorted({int(j["worker_id"].rsplit(":", 1)[1]) for j in busy}) or m.worker_pids()
        if not pids:
            self.note(KILL_WORKER, m.name, skipped="no worker process registered")
            return
        pid = pids[0]
        held = [j["id"] for j in busy if j["worker_id"].endswith(f":{pid}")]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.note(KILL_WORKER, m.name, skipped=f"pid {pid} already gone")
            return
        wall = time.time()
        self.note(KILL_WORKER, m.name, pid=pid, generation=m.generation, jobs_in_flight=held, wall=wall,
                  host=m.worker_name)
        self._watch_back(self.events[-1], held, {f"{m.worker_name}:{pid}"}, wall)

    def _lease(self) -> float:
        from aibot.settings import Settings

        return float(self.cfg.lease_seconds or Settings.model_fields["lease_seconds"].default)

    def _watch_back(self, event: dict, ids: list[int], dead: set[str], wall: float) -> None:
        """Records in the event when the last of `ids` left the dead worker (re-queued by the reclaim,
        or already claimed by another): `back_s` after the kill. Watched from a thread, because the
        jobs row keeps only the latest claim."""
        if not ids:
            return

        def watch():
            pending = set(ids)
            deadline = time.monotonic() + 180
            while pending and time.monotonic() < deadline and not self._stop.is_set():
                try:
                    rows = self.query("SELECT id, state::text AS state, worker_id FROM aibot.jobs WHERE id = ANY(%s)",
                                      (list(pending),), retry_for=5)
                except psycopg.OperationalError:
                    rows = []
                for r in rows:
                    if r["state"] != "running" or r["worker_id"] not in dead:
                        pending.discard(r["id"])
                if pending:
                    time.sleep(0.2)
            event["detail"]["back_s"] = None if pending else round(time.time() - wall, 1)

        threading.Thread(target=self._guard(watch), name="chaos-recovery", daemon=True).start()

    def _do_kill_master(self, ev: Event) -> None:
        m = self.masters[ev.target]
        busy = self._wait_busy(m)
        with m.lock:
            m.expected_exit.set()
            proc = m.proc
        proc.kill()   # SIGKILL to the whole process group: the host's supervisor, masters and workers at once
        wall = time.time()
        held = [j["id"] for j in busy]
        self.note(KILL_MASTER, m.name, pid=proc.pid, generation=m.generation, jobs_in_flight=held, wall=wall)
        self._watch_back(self.events[-1], held, {j["worker_id"] for j in busy}, wall)
        m.start()

    def _do_term_master(self, ev: Event) -> None:
        m = self.masters[ev.target]
        busy = self._wait_busy(m)
        with m.lock:
            m.expected_exit.set()
            proc, name = m.proc, m.worker_name
        outstanding = self.scalar("SELECT count(*) FROM dramatiq.queue WHERE state = 'consumed'")
        t = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        try:
            rc = proc.popen.wait(40)
        except subprocess.TimeoutExpired:
            rc = None
            self.errors.append(f"master {name} did not exit within 40 s of SIGTERM")
            proc.kill()
        took = time.monotonic() - t
        left = self.query("SELECT id, worker_id, state FROM aibot.jobs WHERE state = 'running' AND worker_id LIKE %s",
                          (name + ":%",))
        self.left_running_after_term.extend(left)
        self.note(TERM_MASTER, m.name, generation=m.generation, jobs_in_flight=len(busy),
                  consumed_doorbells=outstanding, returncode=rc, exit_seconds=round(took, 1),
                  left_running=len(left))
        m.start()

    def _do_terminate_backends(self, ev: Event) -> None:
        """Waits (briefly) for replies being posted or completed (running jobs with a stored reply) and
        for generations, so the sessions die under claims, stores and completions in flight."""
        deadline = time.monotonic() + 4.0
        posting = []
        while time.monotonic() < deadline and not posting:
            posting = self.query("SELECT id FROM aibot.jobs WHERE state = 'running' AND reply IS NOT NULL")
            if not posting:
                time.sleep(0.02)
        running = self.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'running'")
        rows = self.query("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        self.note(TERMINATE_BACKENDS, "", terminated=rows[0]["n"], running=running, posting=len(posting))

    def _do_restart_postgres(self, ev: Event) -> None:
        t = time.monotonic()
        proc = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "restart"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            self.errors.append(f"pg_ctlcluster restart failed: {proc.stderr.strip()}")
        self.query("SELECT 1", retry_for=60)
        self.note(RESTART_POSTGRES, "", seconds=round(time.monotonic() - t, 1), returncode=proc.returncode)

    def _do_server_outage(self, ev: Event) -> None:
        self.sims[ev.target].begin_outage(seconds=ev.seconds, mode="refuse")
        self.note(SERVER_OUTAGE, ev.target, seconds=ev.seconds, ends=time.time() + ev.seconds)
        self._watch_recovery(self.events[-1], ev.target, ev.seconds)

    def _chat_requests(self, server: str) -> int:
        by_endpoint = self.sims[server].stats()["requests"]["by_endpoint"]
        return sum(n for endpoint, n in by_endpoint.items() if "chat" in endpoint or "generate" in endpoint)

    def _watch_recovery(self, event: dict, server: str, seconds: float) -> None:
        """Records, live, how soon after the outage's end the server is healthy again in aibot's shared
        state (`healthy_s`) and receives its first generation request (`serving_s`). The first finished
        reply (`first_reply_s`, from the jobs table) also waits for whatever else the schedule does then
        (host kills right after the outage leave no worker to claim), so it is not the server's recovery."""

        def watch():
            end = time.monotonic() + seconds
            while time.monotonic() < end and not self._stop.is_set():
                time.sleep(0.05)
            base = self._chat_requests(server)
            deadline = time.monotonic() + 120
            start = time.monotonic()
            healthy = serving = None
            while (healthy is None or serving is None) and time.monotonic() < deadline and not self._stop.is_set():
                if healthy is None:
                    try:
                        row = self.query("SELECT health::text AS health FROM aibot.servers WHERE name = %s",
                                         (server,), retry_for=5)
                    except psycopg.OperationalError:
                        row = []
                    if row and row[0]["health"] == "healthy":
                        healthy = round(time.monotonic() - start, 1)
                if serving is None and self._chat_requests(server) > base:
                    serving = round(time.monotonic() - start, 1)
                time.sleep(0.1)
            event["detail"].update(healthy_s=healthy, serving_s=serving)

        threading.Thread(target=self._guard(watch), name="chaos-outage-recovery", daemon=True).start()

    # --- the end -----------------------------------------------------------------------------------

    def _wait_quiet(self) -> None:
        """Until every posted message has a job and every job has ended (or the timeout)."""
        deadline = time.monotonic() + self.cfg.quiesce_timeout
        n = len(self.posted)
        while time.monotonic() < deadline:
            row = self.query("SELECT count(*) AS jobs, count(*) FILTER (WHERE state IN ('queued', 'running')) AS open "
                             "FROM aibot.jobs")[0]
            if row["jobs"] >= n and row["open"] == 0:
                self.note("quiet", jobs=row["jobs"])
                return
            time.sleep(0.5)
        states = self.query("SELECT state, count(*) FROM aibot.jobs GROUP BY 1")
        # What the stuck jobs wait for, so a failure says why, not only how many.
        waiting = self.query(
            "SELECT model, count(*)::int AS n, min(extract(epoch FROM available_at - now()))::int AS due_in_s, "
            "max(attempts) AS attempts, max(last_error) AS last_error FROM aibot.jobs "
            "WHERE state IN ('queued', 'running') GROUP BY model")
        held = self.query("SELECT s.name, sl.model, count(*)::int AS slots, count(sl.job_id)::int AS held, "
                          "bool_or(sl.retired) AS retired FROM aibot.slots sl JOIN aibot.servers s ON s.id = sl.server_id "
                          "GROUP BY 1, 2 ORDER BY 1, 2")
        resident = self.query("SELECT s.name, mi.model, mi.state, mi.draining FROM aibot.model_instances mi "
                              "JOIN aibot.servers s ON s.id = mi.server_id ORDER BY 1, 2")
        self.errors.append(f"not quiet after {self.cfg.quiesce_timeout}s: {states}; waiting: {waiting}; "
                           f"slots: {held}; resident: {resident}")

    def _collect(self, schedule: list[Event], timings: dict) -> ChaosResult:
        jobs = self.query("SELECT id, source_message_id, state, reason, last_error, attempts, server_faults "
                          "FROM aibot.jobs")
        loads = self.query("SELECT server_id, model, started_at, finished_at, ok, worker_id FROM aibot.model_loads "
                           "WHERE action = 'load'")
        peaks, instances, faults, queued_peaks = [], [], Counter(), {}
        for server in self.sims.servers:
            st = server.stats()
            parallel = {mm.key: server.config.parallel_for(mm) for mm in server.config.models}
            for model, ms in st["models"].items():
                peaks.append((server.name, model, ms["peak_in_flight"], parallel[model]))
                instances.append((server.name, model, max(ms["loaded_instances"],
                                                          self.peak_instances.get((server.name, model), 0))))
                queued_peaks[f"{server.name}/{model}"] = ms["peak_queued"]
            faults.update(server.faults.injected)
        post_log = self.chat.post_log()
        obs = Observed(messages=self.posted, replies_by_reply_to=self.chat.replies_by_reply_to(), jobs=jobs,
                       max_lease_overdue=self.max_overdue, lease_margin=self.cfg.lease_margin, peaks=peaks,
                       loaded_instances=instances, loads=loads, left_running_after_term=self.left_running_after_term,
                       post_log=post_log)
        self._sample_instances()
        counts, violations = verdict(obs)
        chat_stats = self.chat.stats()
        return ChaosResult(
            config={**asdict(self.cfg), "pg_restart": self.pg_restart},
            schedule=[e.to_dict() for e in schedule], events=self.events, counts=counts, violations=violations,
            faults=dict(faults), chat={k: chat_stats[k] for k in ("posts", "stored", "duplicates", "faults", "ack_lost")},
            loads={"ok": sum(1 for r in loads if r["ok"]), "failed": sum(1 for r in loads if r["ok"] is False),
                   "unfinished": sum(1 for r in loads if r["ok"] is None)},
            peaks=[list(p) for p in peaks] + [["peak_queued", queued_peaks]],
            max_lease_overdue=round(self.max_overdue, 2), timings={**timings, "peak_db_sessions": self.peak_sessions},
            job_states=dict(Counter(j["state"] for j in jobs)), errors=list(self.errors),
            sink=sink_repeats(post_log), recovery=self._recovery(),
        )

    def _recovery(self) -> dict:
        """Recovery times, from the jobs table after the run:
        - per kill (-9 of a worker process or of a whole host): seconds until the last job it held was
          back (re-queued or claimed by another worker: `back_s`) and answered (`done_s`, the last
          finish, which includes any later retry of an injected fault);
        - per worker-process kill: the host's replies in the 10 s after it over the 10 s before
          (`host_rate_ratio`; ≥ (processes − 1) / processes is the promise when the host is saturated);
        - per outage: seconds from its end until aibot holds the server healthy (`healthy_s`), until it
          sends the server a generation (`serving_s`: the recovery promise, ≤ 5 s) and until the server's
          first finished reply (`first_reply_s`)."""
        out: dict[str, list] = {"kills": [], "outages": []}
        for e in self.events:
            d = e["detail"]
            if e["kind"] in (KILL_WORKER, KILL_MASTER) and d.get("wall") is not None:
                ids = list(d.get("jobs_in_flight") or [])
                entry = {"kind": e["kind"], "target": e["target"], "jobs": len(ids)}
                if ids:
                    row = self.query("SELECT max(extract(epoch FROM finished_at))::float AS done FROM aibot.jobs "
                                     "WHERE id = ANY(%s)", (ids,))[0]
                    entry["back_s"] = d.get("back_s")   # watched live (`_watch_back`)
                    entry["done_s"] = None if row["done"] is None else round(row["done"] - d["wall"], 1)
                if e["kind"] == KILL_WORKER and d.get("host"):
                    row = self.query(
                        "SELECT count(*) FILTER (WHERE finished_at < to_timestamp(%(t)s)) AS before, "
                        "count(*) FILTER (WHERE finished_at >= to_timestamp(%(t)s)) AS after FROM aibot.jobs "
                        "WHERE state = 'done' AND worker_id LIKE %(w)s "
                        "AND finished_at BETWEEN to_timestamp(%(t)s - 10) AND to_timestamp(%(t)s + 10)",
                        {"t": d["wall"], "w": d["host"] + ":%"})[0]
                    entry.update(before=row["before"], after=row["after"],
                                 host_rate_ratio=round(row["after"] / row["before"], 2) if row["before"] else None)
                out["kills"].append(entry)
            elif e["kind"] == SERVER_OUTAGE and d.get("ends") is not None:
                row = self.query("SELECT min(extract(epoch FROM j.finished_at))::float AS first FROM aibot.jobs j "
                                 "JOIN aibot.servers s ON s.id = j.server_id WHERE s.name = %s AND j.state = 'done' "
                                 "AND j.finished_at > to_timestamp(%s)", (e["target"], d["ends"]))[0]
                out["outages"].append({"server": e["target"], "seconds": d.get("seconds"),
                                       "healthy_s": d.get("healthy_s"), "serving_s": d.get("serving_s"),
                                       "first_reply_s": None if row["first"] is None else round(row["first"] - d["ends"], 1)})
        backs = [k["back_s"] for k in out["kills"] if k.get("back_s") is not None]
        out["worst_kill_back_s"] = max(backs) if backs else None
        return out

    def _leftover_processes(self) -> list[str]:
        return [f"{p.name} (pid {p.pid}) still alive after stop" for p in self.stack.procs if p.alive()]


def write_result(result: ChaosResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
