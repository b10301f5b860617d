"""Benchmark 4: aibot's dispatch overhead with a zero-latency backend, against the transport's ceiling
and two other Postgres job queues, all on the same Postgres in the same run.

    python bench/overhead.py [--database-url URL] [--jobs 20000] [--processes 2] [--threads 8]

Per system, a fresh scratch database; workers are started and warmed up first, then all jobs are
enqueued in one transaction and the clock runs from its commit to the moment nothing is left open:

  aibot          real `dramatiq aibot.actors` workers, jobs ingested through the bot's ingest (jobs and
                 doorbells in one transaction), each job claimed with a slot, "generated" by a loopback
                 OpenAI-compatible responder that answers instantly (bench/baselines/loopback.py),
                 reply stored, delivered to the postgres sink (aibot.replies), completed
  dramatiq-noop  Dramatiq no-op actor on dramatiq-postgres with aibot's broker options, same processes
                 and threads: one broker message per job (the transport's ceiling)
  procrastinate  procrastinate no-op task, same number of worker processes, concurrency = threads
  pgqueuer       PgQueuer no-op entrypoint, same number of worker processes, default batch size
  what-ifs       aibot+async-commit, aibot+quiet-log, whatif-lean(+async-commit): measurements of the
                 proposed changes (docs/benchmarks-overhead.md), not product settings

The default order runs aibot three times and dramatiq-noop twice, interleaved with the others, and the
summary uses each system's median: other users' load on the shared machine drifts within a run.
Also recorded per system: server-side transactions per job (pg_stat_database, minus our own polls) and CPU
milliseconds per job of the workers, of the Postgres backends serving that database, and of the
responder (psutil). `--profile-jobs N` additionally runs N aibot jobs in-process on one thread with libpq
tracing and counts the client/server round trips per job by statement (docs/benchmarks-overhead.md).

Prints a table; writes bench/results/overhead.json and overhead.png. Ratios are the result: the machine
is small and shared, so absolute rates move from run to run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter as Tally
from pathlib import Path
from types import SimpleNamespace

import common  # bench/common.py; also puts the repository on sys.path

from bench.baselines import harness  # noqa: E402

import psycopg  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from aibot import db  # noqa: E402
from aibot.harness import Stack, entity, write_config  # noqa: E402

NAME = "overhead"
MODEL = "bench-model"
TARGET_JOBS_PER_S = 1500.0
PY = sys.executable


# ---------------------------------------------------------------------------------------------------
# CPU accounting
# ---------------------------------------------------------------------------------------------------

def _tree(pid: int) -> list:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # exited meanwhile
            pass
    return total


def backends_of(dbname: str) -> list:
    """Postgres backend processes serving `dbname` (their title names the database)."""
    import psutil

    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
        except Exception:
            continue
        if title.startswith("postgres: ") and f" {dbname} " in f" {title} ":
            out.append(p)
    return out


class CpuMeter:
    """CPU seconds used during the measured window by the workers, the database's backends and the
    responder. Backends are looked up at start (workers are warmed up, so their connections exist)."""

    def __init__(self, dbname: str, worker_pids: list[int], responder_pid: int | None = None):
        self.groups = {
            "workers": [p for pid in worker_pids for p in _tree(pid)],
            "postgres": backends_of(dbname),
            "responder": _tree(responder_pid) if responder_pid else [],
        }
        self.start = {k: _cpu(v) for k, v in self.groups.items()}

    def stop(self) -> dict[str, float]:
        return {k: _cpu(v) - self.start[k] for k, v in self.groups.items()}


# ---------------------------------------------------------------------------------------------------
# one measured run
# ---------------------------------------------------------------------------------------------------

def dbname_of(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def measure(label: str, url: str, n: int, enqueue, open_query: str, params: dict | None, stack: Stack,
            worker_pids: list[int], responder_pid: int | None, timeout: float, during=None) -> dict:
    """Enqueues `n` jobs (one commit), waits until `open_query` counts zero, and returns the numbers."""
    counter = harness.Counter(url, open_query, params)
    try:
        before = harness.xact_counts(url)
        cpu = CpuMeter(dbname_of(url), worker_pids, responder_pid)
        t_enq = time.perf_counter()
        enqueue(n)
        t0 = time.perf_counter()
        if during:
            during()
        last = {"open": n}

        def polled() -> int:
            last["open"] = counter()
            return last["open"]

        def problem() -> str | None:
            dead = [p for p in stack.procs if not p.alive()]
            return f"{dead[0].name} exited ({dead[0].popen.returncode}):\n{dead[0].log()[-3000:]}" if dead else None

        with common.Ticker(label, lambda: f"{n - last['open']:>6}/{n} done  {(n - last['open']) / max(1e-9, time.perf_counter() - t0):7.0f} jobs/s"):
            t_end = harness.wait_drained(polled, timeout=timeout, problem=problem)
        cpu_s = cpu.stop()
        polls = counter.polls
    finally:
        counter.close()
    seconds = t_end - t0
    return {"system": label, "jobs": n, "enqueue_seconds": round(t0 - t_enq, 3), "seconds": round(seconds, 3),
            "jobs_per_second": round(n / seconds, 1), "_before": before, "_polls": polls,
            "cpu_ms_per_job": {k: round(v * 1000 / n, 3) for k, v in cpu_s.items()}}


def finish(result: dict, url: str, stack: Stack) -> dict:
    """Stops the workers (their backends exit, which flushes their statistics) and adds commit counts."""
    stack.stop(60)
    # A backend publishes its statistics when it exits, a moment after its client is gone: wait for
    # every backend of the workers to be gone, or the last transactions are missing from the count.
    dbname = dbname_of(url)
    try:
        common.wait_until(lambda: not backends_of(dbname), 20, "the workers' backends to exit", 0.05)
    except TimeoutError:
        common.log("warning: some backends are still connected; transaction counts may be low")
    after = harness.xact_counts(url)
    d = harness.xact_delta(result.pop("_before"), after)
    polls = result.pop("_polls") + 1   # + the xact_counts read itself
    n = result["jobs"]
    # Every autocommit statement is a transaction too, so this counts server-side transactions.
    result["xacts_per_job"] = round((d["xact_commit"] - polls) / n, 2)
    result["rows_changed_per_job"] = round((d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]) / n, 2)
    return result


def wait_log(proc, pattern: str, count: int = 1, timeout: float = 60) -> re.Match:
    """Waits until `pattern` appears `count` times in a process log (start-up banners), failing fast on exit."""
    rx = re.compile(pattern)

    def seen():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}")
        found = list(rx.finditer(proc.log()))
        return found[count - 1] if len(found) >= count else None

    return common.wait_until(seen, timeout, f"{count}x {pattern!r} in {proc.name}'s log", 0.05)


def wait_count(url: str, query: str, at_least: int, what: str, procs, timeout: float = 90) -> None:
    def ok():
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.log()[-3000:]}")
        return harness.q1(url, query)["n"] >= at_least

    common.wait_until(ok, timeout, what, 0.1)


def drain(url: str, query: str, params: dict | None = None, timeout: float = 60) -> None:
    counter = harness.Counter(url, query, params)
    try:
        harness.wait_drained(counter, timeout=timeout)
    finally:
        counter.close()


# ---------------------------------------------------------------------------------------------------
# the systems
# ---------------------------------------------------------------------------------------------------

def human_messages(start: int, n: int, entities: list[str]) -> list[dict]:
    """Messages as the chat frontend posts them, spread over the entities, priorities 0..99."""
    return [{"id": f"m{i}", "text": f"hello number {i}, what do you think?", "username": f"user{i % 50}",
             "color": "100150200", "domain": "saywhatwant.app", "message-type": "human",
             "timestamp": 1_700_000_000_000 + i,
             "botParams": {"entity": entities[i % len(entities)], "priority": i % 100}}
            for i in range(start, start + n)]


def start_responder(stack: Stack, models: list[str]) -> tuple[str, int]:
    proc = stack.spawn("loopback", [PY, "-m", "bench.baselines.loopback", *[a for m in models for a in ("--model", m)]],
                       env={"PYTHONPATH": str(common.REPO)})
    m = wait_log(proc, r"READY (http://\S+)")
    return m.group(1), proc.pid


def aibot_config(path: Path, url: str, slots: int, n_entities: int) -> str:
    servers = [{"name": "loopback", "url": url, "kind": "openai", "enabled": True, "defaultParallel": slots,
                "hardCap": slots, "capabilities": {"maxMemory": 4096}}]
    ents = [entity(f"e{i}", MODEL, maxTokens=40) for i in range(1, n_entities + 1)]
    return write_config(path, servers=servers, entities=ents)


def run_aibot(admin_url: str, args, workdir: Path, *, label: str = "aibot", extra_env: dict | None = None,
              lean: bool = False, worker_tree: Path | None = None) -> dict:
    with common.scratch_database(admin_url, "ovh_aibot", tree=worker_tree) as url:
        os.environ["AIBOT_DATABASE_URL"] = url   # the ingest's doorbell asks which broker kind is in use
        if args.statement_log:
            # Every statement of this database only, in the server's log (read back after the run).
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{dbname_of(url)}" SET log_statement = \'all\'')
        # A fresh directory per run: the config names this run's responder, and aibot caches config
        # stores by path.
        rundir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=workdir))
        stack = Stack(url, str(rundir / "config.json"), workdir=rundir)
        try:
            resp_url, resp_pid = start_responder(stack, [MODEL])
            slots = args.processes * args.threads
            aibot_config(rundir / "config.json", resp_url, slots, args.entities)
            from aibot.cluster import refresh

            database = db.Database(url, max_size=2)
            try:
                refresh.refresh_all(database, config_path=stack.config_path)
            finally:
                database.close()
            got = harness.q1(url, "bench_aibot_slot_total")["n"]
            if got != slots:
                raise RuntimeError(f"expected {slots} slots for the loopback server, the rebalancer made {got}")
            env = {"AIBOT_SINK": args.sink, "AIBOT_SHUTDOWN_TIMEOUT": "5"}
            if args.log_level:
                env["AIBOT_LOG_LEVEL"] = args.log_level
            env.update(extra_env or {})
            if lean:   # the what-if prototype instead of `dramatiq aibot.actors`
                procs = [stack.spawn(f"lean-{i}", [PY, "-m", "bench.baselines.lean_loop", "--threads", str(args.threads),
                                                  "--backend-url", resp_url], env={**env, "PYTHONPATH": str(common.REPO)})
                         for i in range(args.processes)]
                for proc in procs:
                    wait_log(proc, r"lean loop ready")
            elif worker_tree:   # dramatiq puts its --path (default: the working directory) first on sys.path
                dramatiq_bin = shutil.which("dramatiq", path=os.path.dirname(PY)) or "dramatiq"
                procs = [stack.spawn("workers", [dramatiq_bin, "aibot.actors", "--path", str(worker_tree),
                                                 "--processes", str(args.processes), "--threads", str(args.threads),
                                                 "--worker-shutdown-timeout", "10000"],
                                     {"AIBOT_WORKER_NAME": "workers", **env, "PYTHONPATH": str(worker_tree)})]
                wait_count(url, "bench_aibot_workers", args.processes, "aibot workers to register", procs)
            else:
                procs = [stack.start_workers("workers", processes=args.processes, threads=args.threads,
                                             shutdown_timeout_ms=10_000, env=env)]
                wait_count(url, "bench_aibot_workers", args.processes, "aibot workers to register", procs)
            workers = procs[0]
            config = _load_config(stack.config_path)
            names = [e.id for e in config.entities]
            seq = {"next": 0}

            def enqueue(k: int) -> None:
                from aibot.bot.ingest import ingest

                msgs = human_messages(seq["next"], k, names)
                seq["next"] += k
                with db.connect(url, autocommit=True) as conn:
                    res = ingest(conn, "chat", msgs, config, settings=SimpleNamespace(aging_seconds=30.0))
                if res.new != k:
                    raise RuntimeError(f"ingest: {res.summary()} (expected {k} new)")

            enqueue(args.warmup)
            drain(url, "bench_aibot_open")
            spy_out = workdir / f"{label}-py-spy.txt"
            spy = {}

            def start_spy() -> None:
                spy["proc"] = subprocess.Popen(
                    [shutil.which("py-spy", path=os.path.dirname(PY)) or "py-spy", "record", "--format", "raw",
                     "--subprocesses", "--nonblocking", "-r", "100", "-d", str(args.py_spy), "-p", str(workers.pid),
                     "-o", str(spy_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            log_from = args.statement_log.stat().st_size if args.statement_log else 0
            result = measure(label, url, args.jobs, enqueue, "bench_aibot_open", None, stack, [w.pid for w in procs],
                             resp_pid, args.timeout,
                             during=start_spy if args.py_spy and label == "aibot" and not args._spied else None)
            args._spied = args._spied or bool(spy)
            if spy:
                try:
                    spy["proc"].wait(args.py_spy + 30)
                except subprocess.TimeoutExpired:
                    # On a loaded machine py-spy falls behind; SIGINT makes it write what it sampled.
                    spy["proc"].send_signal(signal.SIGINT)
                    try:
                        spy["proc"].wait(60)
                    except subprocess.TimeoutExpired:
                        spy["proc"].kill()
                        spy["proc"].wait()
                result["py_spy"] = summarize_py_spy(spy_out.read_text()) if spy_out.exists() else None
            if args.statement_log:
                result["server_statements"] = statement_tally(args.statement_log, log_from, dbname_of(url),
                                                              args.jobs + 0)
            log_bytes = sum(len(w.log()) for w in procs)
            finish(result, url, stack)
            states = {r["state"]: r["n"] for r in _rows(url, "bench_aibot_states")}
            total = args.jobs + args.warmup
            if states != {"done": total}:
                raise RuntimeError(f"{label}: expected {total} done jobs, got {states}")
            if args.sink == "postgres":
                rep = harness.q1(url, "bench_aibot_replies")
                if rep["replies"] != total or rep["jobs"] != total:
                    raise RuntimeError(f"{label}: expected {total} replies for {total} jobs, got {rep}")
            span = harness.q1(url, "bench_aibot_span_since", {"after": args.warmup})
            per_worker = [r["n"] for r in _rows(url, "bench_aibot_per_worker", {"after": args.warmup})]
            result.update({
                "sink": args.sink, "slots": slots,
                "db_span_seconds": round(span["seconds"], 3),
                "jobs_per_process": per_worker,
                "log_bytes_per_job": round(log_bytes / total, 1),
            })
            return result
        finally:
            stack.stop()


def run_dramatiq(admin_url: str, args, workdir: Path) -> dict:
    from bench.baselines import dramatiq_noop

    with common.scratch_database(admin_url, "ovh_dramatiq") as url:
        stack = Stack(url, "-", workdir=workdir / "dramatiq")
        try:
            dramatiq_bin = shutil.which("dramatiq", path=os.path.dirname(PY)) or "dramatiq"
            workers = stack.spawn("dramatiq-noop", [
                dramatiq_bin, "bench.baselines.dramatiq_noop",
                "--processes", str(args.processes), "--threads", str(args.threads),
                "--worker-shutdown-timeout", "10000"], env={"BENCH_DATABASE_URL": url, "PYTHONPATH": str(common.REPO)})
            wait_count(url, "bench_dramatiq_workers", args.processes, "dramatiq-postgres consumers", [workers])

            def enqueue(k: int) -> None:
                with db.connect(url) as conn:
                    dramatiq_noop.enqueue(conn, k)
                    conn.commit()

            params = {"queue": dramatiq_noop.QUEUE}
            enqueue(args.warmup)
            drain(url, "bench_dramatiq_open", params)
            result = measure("dramatiq-noop", url, args.jobs, enqueue, "bench_dramatiq_open", params, stack,
                             [workers.pid], None, args.timeout)
            return finish(result, url, stack)
        finally:
            stack.stop()


def run_procrastinate(admin_url: str, args, workdir: Path) -> dict:
    with common.scratch_database(admin_url, "ovh_procrastinate") as url:
        env = {"BENCH_DATABASE_URL": url, "PYTHONPATH": str(common.REPO)}
        os.environ["BENCH_DATABASE_URL"] = url
        from bench.baselines import procrastinate_noop

        procrastinate_noop.install()
        stack = Stack(url, "-", workdir=workdir / "procrastinate")
        try:
            procs = [stack.spawn(f"procrastinate-{i}", [PY, "-m", "bench.baselines.procrastinate_noop", "worker",
                                                       "--concurrency", str(args.threads)], env=env)
                     for i in range(args.processes)]
            wait_count(url, "bench_procrastinate_workers", args.processes, "procrastinate workers", procs)
            procrastinate_noop.enqueue(args.warmup)
            drain(url, "bench_procrastinate_open")
            result = measure("procrastinate", url, args.jobs, procrastinate_noop.enqueue, "bench_procrastinate_open",
                             None, stack, [p.pid for p in procs], None, args.timeout)
            return finish(result, url, stack)
        finally:
            stack.stop()


def run_pgqueuer(admin_url: str, args, workdir: Path) -> dict:
    with common.scratch_database(admin_url, "ovh_pgqueuer") as url:
        env = {"BENCH_DATABASE_URL": url, "PYTHONPATH": str(common.REPO)}
        os.environ["BENCH_DATABASE_URL"] = url
        from bench.baselines import pgqueuer_noop

        pgqueuer_noop.install()
        stack = Stack(url, "-", workdir=workdir / "pgqueuer")
        try:
            procs = [stack.spawn(f"pgqueuer-{i}", [PY, "-m", "bench.baselines.pgqueuer_noop", "worker"], env=env)
                     for i in range(args.processes)]
            for p in procs:
                wait_log(p, r"pgqueuer worker ready")
            pgqueuer_noop.enqueue(args.warmup)
            drain(url, "bench_pgqueuer_open")
            result = measure("pgqueuer", url, args.jobs, pgqueuer_noop.enqueue, "bench_pgqueuer_open", None, stack,
                             [p.pid for p in procs], None, args.timeout)
            return finish(result, url, stack)
        finally:
            stack.stop()


PY_SPY_RULES = [   # (bucket, any of these substrings in the sampled stack); first match wins
    ("Postgres: waiting for COMMIT (WAL flush)", ("Transaction.__exit__", "Connection.commit")),
    ("Postgres: pool connection check", ("check_connection",)),
    ("Postgres: waiting for BEGIN", ("Transaction.__enter__",)),
    ("Postgres: statements (send, wait, parse rows)", ("psycopg/",)),
    ("HTTP to the backend (httpx/httpcore)", ("httpx/", "httpcore/")),
    ("logging (format, pipe to the dramatiq master)", ("logging/__init__.py", "aibot/log.py")),
    ("dramatiq (consumer, worker threads, broker)", ("dramatiq/", "dramatiq_postgres/")),
]


def summarize_py_spy(raw: str) -> dict:
    """Attributes every sampled stack of the aibot worker processes to one bucket, so "where per-job
    time goes" is read from samples rather than guessed. py-spy samples threads that are not idle,
    which includes threads blocked in a socket read for Postgres or HTTP."""
    buckets: Tally = Tally()
    leaf: Tally = Tally()          # the innermost frame: where the sample was taken
    inner_aibot: Tally = Tally()   # the innermost aibot frame of each stack: which product code led there
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        bucket = next((b for b, subs in PY_SPY_RULES if any(sub in stack for sub in subs)), "other Python")
        buckets[bucket] += n
        frames = stack.split(";")
        leaf[_frame(frames[-1])] += n
        mine = [f for f in frames if "(aibot/" in f or "/aibot/" in f]
        if mine:
            inner_aibot[_frame(mine[-1])] += n
    total = total or 1
    return {"samples": total, "share": {k: round(v / total, 3) for k, v in buckets.most_common()},
            "top_leaf_frames": {k: round(v / total, 3) for k, v in leaf.most_common(15)},
            "top_innermost_aibot_frames": {k: round(v / total, 3) for k, v in inner_aibot.most_common(15)}}


def _frame(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py:12)', short enough for a table."""
    m = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame[:100]
    path = m.group(2)
    short = path.split("site-packages/")[-1] if "site-packages/" in path else "/".join(path.split("/")[-2:])
    return f"{m.group(1)} ({short}:{m.group(3)})"


def run_with_retry(system: str, args, workdir: Path, attempts: int = 3) -> dict:
    """Runs one system; if Postgres restarts under it (other users' chaos tests do that on this shared
    machine), waits for the server and runs it again from scratch, at most `attempts` times."""
    for attempt in range(1, attempts + 1):
        try:
            return SYSTEMS[system](args.database_url, args, workdir)
        except psycopg.OperationalError as exc:
            if attempt == attempts:
                raise
            common.log(f"\n{system}: Postgres went away ({str(exc).strip().splitlines()[0]}); retrying")
            common.wait_until(lambda: _accepts(args.database_url), 120, "Postgres to accept connections", 0.5)
    raise AssertionError("unreachable")


def _accepts(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def drop_leftovers(admin_url: str) -> None:
    """Drops this process's scratch databases that a Postgres restart kept from being dropped."""
    from psycopg import sql

    try:
        with psycopg.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            for r in harness.q(admin, "bench_leftover_databases", {"pattern": f"aibot_bench_ovh_%_{os.getpid()}_%"}):
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(r["datname"])))
                common.log(f"dropped leftover scratch database {r['datname']}")
    except psycopg.OperationalError as exc:
        common.log(f"could not check for leftover scratch databases: {exc}")


def _rows(url: str, name: str, params: dict | None = None) -> list[dict]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return harness.q(conn, name, params)


def _load_config(path: str):
    """The bench entities have no rate limits on purpose; the loader's warning about it is noise here."""
    import logging

    from aibot.config import load_config

    logging.getLogger("aibot.config").setLevel(logging.ERROR)
    return load_config(path)


_LOG_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] \S*@(\S+) LOG:  (?:statement|execute [^:]*): (.*)$")


def statement_tally(path: Path, start: int, dbname: str, jobs: int) -> dict:
    """Server-side statements and transactions per job, by statement, from `log_statement = all` lines.

    pg_stat_statements is not loaded on the shared server, so the server's own log is read instead:
    every statement of the scratch database from the measured run (its first line, 70 characters, is
    the key). A transaction is a BEGIN … COMMIT/ROLLBACK block, or one statement outside a block
    (autocommit); it is attributed to the first statement it ran after BEGIN.
    """
    tally: Tally = Tally()
    xacts: Tally = Tally()
    open_block: dict[str, str | None] = {}
    with open(path, "rb") as f:
        f.seek(start)
        for raw in f:
            m = _LOG_LINE.match(raw.decode("utf-8", "replace").rstrip("\n"))
            if not m or m.group(2) != dbname:
                continue
            pid, text = m.group(1), " ".join(m.group(3).split())
            key = text[:70]
            tally[key] += 1
            word = text.split(" ", 1)[0].upper().rstrip(";")
            if word in ("BEGIN", "START"):
                open_block[pid] = None
            elif word in ("COMMIT", "ROLLBACK", "END"):
                xacts[open_block.pop(pid, None) or "(empty block)"] += 1
            elif pid in open_block:
                if open_block[pid] is None:
                    open_block[pid] = key
            else:
                xacts[key] += 1
    n = max(jobs, 1)
    return {"statements_per_job": round(sum(tally.values()) / n, 2),
            "transactions_per_job": round(sum(xacts.values()) / n, 2),
            "by_statement": {k: round(v / n, 3) for k, v in tally.most_common(25)},
            "transactions_by_first_statement": {k: round(v / n, 3) for k, v in xacts.most_common(25)}}


def run_aibot_async_commit(admin_url: str, args, workdir: Path) -> dict:
    """What-if, not a product setting: the same aibot with `synchronous_commit = off` on the workers'
    connections (libpq PGOPTIONS), to measure how much of the per-job time is waiting for WAL flushes."""
    return run_aibot(admin_url, args, workdir, label="aibot+async-commit",
                     extra_env={"PGOPTIONS": "-c synchronous_commit=off"})


def run_aibot_quiet(admin_url: str, args, workdir: Path) -> dict:
    """What-if: the same aibot with AIBOT_LOG_LEVEL=WARNING (no two INFO lines per job through the pipe)."""
    return run_aibot(admin_url, args, workdir, label="aibot+quiet-log", extra_env={"AIBOT_LOG_LEVEL": "WARNING"})


DEFAULT_ORDER = ["aibot", "dramatiq-noop", "procrastinate", "pgqueuer", "whatif-lean", "aibot", "dramatiq-noop",
                 "whatif-lean+async-commit", "aibot+async-commit", "aibot"]


def run_whatif_lean(admin_url: str, args, workdir: Path) -> dict:
    """What-if prototype of the proposed changes (bench/baselines/lean_loop.py), same database, config,
    claim function, backend and sink table as `aibot`; not product code."""
    return run_aibot(admin_url, args, workdir, label="whatif-lean", lean=True)


def run_whatif_lean_async(admin_url: str, args, workdir: Path) -> dict:
    """The prototype plus `synchronous_commit = off` on its connections."""
    return run_aibot(admin_url, args, workdir, label="whatif-lean+async-commit", lean=True,
                     extra_env={"PGOPTIONS": "-c synchronous_commit=off"})


def run_aibot_base(admin_url: str, args, workdir: Path, which: int = 0) -> dict:
    """The same aibot run with the workers importing `--baseline-tree` (another checkout, e.g. the
    commit before a change) instead of this one: before and after in one run, so their ratio holds
    on a busy machine. The worker processes and the migrations are the baseline's; this script's
    ingest and refresh are this tree's (so they must work on the baseline's schema)."""
    trees = args.baseline_tree or []
    if len(trees) <= which:
        raise SystemExit(f"--systems aibot-base{which + 1 if which else ''} needs {which + 1} --baseline-tree")
    tree = trees[which].resolve()
    result = run_aibot(admin_url, args, workdir, label=f"aibot-base{which + 1 if which else ''}", worker_tree=tree)
    result["baseline_commit"] = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip() or None
    return result


SYSTEMS = {"aibot": run_aibot, "aibot-base": run_aibot_base,
           "aibot-base2": lambda admin_url, args, workdir: run_aibot_base(admin_url, args, workdir, 1), "dramatiq-noop": run_dramatiq, "procrastinate": run_procrastinate,
           "pgqueuer": run_pgqueuer, "aibot+async-commit": run_aibot_async_commit, "aibot+quiet-log": run_aibot_quiet,
           "whatif-lean": run_whatif_lean, "whatif-lean+async-commit": run_whatif_lean_async}


# ---------------------------------------------------------------------------------------------------
# round trips per job (in-process, libpq trace)
# ---------------------------------------------------------------------------------------------------

STATEMENT_KINDS = [
    ("claim", re.compile(r"claim_jobs\(")),
    ("store_reply", re.compile(r"SET reply = ")),
    ("complete", re.compile(r"SET state = \$\d+::job_state")),
    ("sink insert", re.compile(r"INSERT INTO replies|INSERT INTO aibot\.replies", re.I)),
    ("BEGIN", re.compile(r"^BEGIN")),
    ("COMMIT", re.compile(r"^COMMIT")),
    ("SAVEPOINT", re.compile(r"^SAVEPOINT")),
    ("RELEASE", re.compile(r"^RELEASE")),
]


def classify(sql_text: str) -> str:
    if not sql_text.strip():
        return "pool check (empty query)"
    for name, rx in STATEMENT_KINDS:
        if rx.search(sql_text):
            return name
    return "other: " + sql_text[:60]


def parse_trace(text: str, start: int = 0) -> tuple[Tally, dict[str, float]]:
    """Client→server round trips in a libpq trace of one connection, and the seconds spent waiting in
    each (first message sent → ReadyForQuery). Each simple Query and each extended-protocol Sync is one
    round trip, named by the SQL it carried; prepared statements (psycopg prepares after 5 uses) are
    named by their earlier Parse, so the whole trace is read and only round trips after offset `start`
    are counted."""
    from datetime import datetime

    tally: Tally = Tally()
    waited: dict[str, float] = {}
    prepared: dict[str, str] = {}
    pending = label = None
    sent_at = None
    pos = 0
    for message in re.split(r"(?m)^(?=(?:[\d-]+ [\d:.]+\t)?[FB]\t\d+\t)", text):   # SQL may span lines
        counting = pos >= start
        pos += len(message)
        parts = message.rstrip("\n").split("\t")
        ts = None
        if parts and parts[0][:1].isdigit():
            ts = datetime.strptime(parts.pop(0), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if len(parts) < 3 or parts[0] not in ("F", "B"):
            continue
        direction, kind, rest = parts[0], parts[2].strip(), "\t".join(parts[3:]).strip()
        if direction == "B":
            if kind == "ReadyForQuery" and label is not None:
                if counting:
                    tally[label] += 1
                    if ts is not None and sent_at is not None:
                        waited[label] = waited.get(label, 0.0) + ts - sent_at
                label = sent_at = None
            continue
        if sent_at is None:
            sent_at = ts
        quoted = re.findall(r'"((?:[^"\\]|\\.)*)"', rest, re.S)
        if kind == "Query":
            label = classify(quoted[0] if quoted else rest)
        elif kind == "Parse" and len(quoted) >= 2:
            prepared[quoted[0]] = pending = classify(quoted[1])
        elif kind == "Bind" and len(quoted) >= 2:
            pending = prepared.get(quoted[1], pending)
        elif kind == "Sync":
            label, pending = pending or "other (unknown prepared statement)", None
    return tally, waited


def profile_round_trips(admin_url: str, args, workdir: Path) -> dict:
    """Runs `args.profile_jobs` jobs through `Runtime.run_invocation` on one thread with every pool
    connection traced, and counts round trips per job by statement."""
    from psycopg.pq import Trace
    from psycopg_pool import ConnectionPool

    from aibot.settings import Settings
    from aibot.worker.runtime import Runtime

    paths = {"runtime": workdir / "libpq-trace-runtime.txt", "sink": workdir / "libpq-trace-sink.txt"}
    with common.scratch_database(admin_url, "ovh_profile") as url, \
            open(paths["runtime"], "w") as rt_file, open(paths["sink"], "w") as sink_file:
        os.environ["AIBOT_DATABASE_URL"] = url
        stack = Stack(url, str(workdir / "profile-config.json"), workdir=workdir / "profile")
        try:
            resp_url, _ = start_responder(stack, [MODEL])
            aibot_config(workdir / "profile-config.json", resp_url, 4, 1)
            from aibot.cluster import refresh

            database = db.Database(url, max_size=2)
            refresh.refresh_all(database, config_path=stack.config_path)
            database.close()
            config = _load_config(stack.config_path)
            from aibot.bot.ingest import ingest

            with db.connect(url, autocommit=True) as conn:
                ingest(conn, "chat", human_messages(0, 5, ["e1"]), config,
                       settings=SimpleNamespace(aging_seconds=30.0))
            rt = Runtime(Settings(database_url=url, config_path=stack.config_path, lease_seconds=600, sink=args.sink))
            def traced_db(trace_file, async_commit=False):
                """A one-connection pool (so prepared-statement names are unambiguous) traced to a file,
                configured as the product configures it (the worker's sessions commit asynchronously;
                before this the trace ran them with synchronous commits, so its COMMIT waits were the
                disk's, not the worker's)."""
                def configure(conn):
                    if async_commit:
                        db._configure_async_commit(conn)
                    else:
                        db._configure(conn)
                    conn.pgconn.trace(trace_file.fileno())
                    conn.pgconn.set_trace_flags(Trace.REGRESS_MODE)

                d = db.Database(url, max_size=1)
                # The product pool's own checkout check and return hook (db.make_pool), so the
                # trace shows the round trips the product makes.
                d._pool = ConnectionPool(url, min_size=1, max_size=1,
                                         kwargs={"row_factory": dict_row, "application_name": "aibot"},
                                         configure=configure,
                                         check=getattr(db, "_check_if_idle", ConnectionPool.check_connection),
                                         reset=getattr(db, "_mark_returned", None),
                                         name="traced", open=False)
                d._pool.open(wait=True)
                d._pid = os.getpid()
                return d

            rt.database = traced_db(rt_file, async_commit=getattr(rt, "async_commit", False))
            if hasattr(rt.sink, "database"):
                rt.sink.database = traced_db(sink_file)
            rt.budget_seconds = 3600
            rt.run_invocation()          # warm-up: server row, config and HTTP client cached
            with db.connect(url, autocommit=True) as conn:
                ingest(conn, "chat", human_messages(10_000, args.profile_jobs, ["e1"]), config,
                       settings=SimpleNamespace(aging_seconds=30.0))
            for f in (rt_file, sink_file):
                f.flush()
            starts = {k: p.stat().st_size for k, p in paths.items()}
            t0, c0 = time.perf_counter(), time.process_time()
            done = rt.run_invocation()   # one invocation claims job after job until none is left
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            # The HTTP call alone, same client and request shape: how much of the Python time it is.
            from aibot.backends.base import ChatRequest

            server = next(iter(rt._servers.values()))[1]      # the loopback row the runtime cached
            backend = rt.backends.get(server)
            req = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], params={"max_tokens": 40})
            h0 = time.process_time()
            for _ in range(500):
                backend.chat(req)
            http_cpu_ms = (time.process_time() - h0) * 1000 / 500
            h0 = time.process_time()
            for _ in range(500):
                "".join(backend.chat_stream(req))      # the worker's default (AIBOT_STREAM=1)
            stream_cpu_ms = (time.process_time() - h0) * 1000 / 500
            for f in (rt_file, sink_file):
                f.flush()
            tally: Tally = Tally()
            waited: dict[str, float] = {}
            for k, p in paths.items():
                counts, secs = parse_trace(p.read_text(errors="replace"), starts[k])
                for name, v in counts.items():
                    key = name if k == "runtime" else f"sink: {name}"
                    tally[key] += v
                    waited[key] = waited.get(key, 0.0) + secs.get(name, 0.0)
            rt.close()
            if hasattr(rt.sink, "database"):
                rt.sink.database.close()
        finally:
            stack.stop()
    order = sorted(tally, key=lambda k: (-tally[k], k))
    per_job = {k: round(tally[k] / done, 2) for k in order}
    wait_ms = {k: round(waited.get(k, 0.0) * 1000 / done, 3) for k in order}
    total_wait = sum(waited.values()) * 1000 / done
    return {"jobs": done, "round_trips_per_job": round(sum(tally.values()) / done, 2), "by_statement": per_job,
            "wait_ms_per_job_by_statement": wait_ms, "db_wait_ms_per_job": round(total_wait, 3),
            "single_thread_ms_per_job": round(elapsed * 1000 / done, 3),
            "client_cpu_ms_per_job": round(cpu * 1000 / done, 3), "http_chat_cpu_ms_per_call": round(http_cpu_ms, 3),
            "http_stream_cpu_ms_per_call": round(stream_cpu_ms, 3),
            "python_ms_per_job": round(elapsed * 1000 / done - total_wait, 3),
            "note": "one invocation claiming until the queue is empty; its final empty claim and the idle "
                    "demand-loader pass are spread over the jobs"}


# ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=64, help="jobs run before the clock starts (boot, connections)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--entities", type=int, default=4, help="aibot entities (all on the one loopback model)")
    p.add_argument("--sink", choices=["postgres", "dry-run"], default="postgres")
    p.add_argument("--log-level", default=None, help="AIBOT_LOG_LEVEL for the aibot workers (default: theirs, INFO)")
    p.add_argument("--systems", default=",".join(DEFAULT_ORDER),
                   help=f"comma-separated runs in order, repeats allowed, from: {', '.join(SYSTEMS)}")
    p.add_argument("--timeout", type=float, default=600, help="seconds per system before giving up")
    p.add_argument("--py-spy", type=int, default=0, metavar="SECONDS",
                   help="sample the aibot workers with py-spy for this many seconds of the measured run")
    p.add_argument("--statement-log", type=Path, default=None, metavar="SERVER_LOG",
                   help="the Postgres server's log file (readable): log every statement of the aibot scratch "
                        "databases and count server statements and transactions per job by statement")
    p.add_argument("--baseline-tree", type=Path, action="append", default=None,
                   help="another checkout whose workers the 'aibot-base' system runs (before/after in one run); "
                        "a second one is 'aibot-base2'")
    p.add_argument("--profile-jobs", type=int, default=0, help="also count round trips per aibot job (in-process)")
    p.add_argument("--quick", action="store_true", help="a fast pass: 2,000 jobs, each system once, no what-ifs")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs = min(args.jobs, 2000)
        if args.systems == ",".join(DEFAULT_ORDER):
            args.systems = "aibot,dramatiq-noop,procrastinate,pgqueuer"
    args._spied = False
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    if args.jobs < 1 or args.processes < 1 or args.threads < 1:
        p.error("--jobs, --processes and --threads must be >= 1")

    import logging

    logging.getLogger("aibot.config").setLevel(logging.ERROR)   # "no rate limits" is on purpose here
    workdir = Path(tempfile.mkdtemp(prefix="aibot-overhead-"))
    common.log(f"{args.jobs} jobs per system, {args.processes} processes x {args.threads} threads; logs in {workdir}")
    results = []
    try:
        seen: Tally = Tally()
        for s in systems:
            seen[s] += 1
            common.log(f"--- {s} (run {seen[s]})")
            r = run_with_retry(s, args, workdir)
            r["run"] = f"{s} #{seen[s]}" if systems.count(s) > 1 else s
            results.append(r)
        profile = profile_round_trips(args.database_url, args, workdir) if args.profile_jobs else None
    finally:
        drop_leftovers(args.database_url)
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    # Other users' load on the machine drifts over minutes, so systems run more than once are
    # summarised by their median, and runs are interleaved in the default order.
    import statistics

    summary = {}
    for name in dict.fromkeys(r["system"] for r in results):
        rates = [r["jobs_per_second"] for r in results if r["system"] == name]
        summary[name] = {"runs": len(rates), "jobs_per_second_median": round(statistics.median(rates), 1),
                         "jobs_per_second_all": rates}
    base = summary.get("aibot")
    ceiling = summary.get("dramatiq-noop")
    for name, v in summary.items():
        v["vs_aibot"] = round(v["jobs_per_second_median"] / base["jobs_per_second_median"], 3) if base else None
    for r in results:
        r["vs_aibot_median"] = round(r["jobs_per_second"] / base["jobs_per_second_median"], 3) if base else None
    first_aibot = next((r for r in results if r["system"] == "aibot"), None)
    rows = [{"run": r["run"], "jobs": r["jobs"], "seconds": r["seconds"], "jobs/s": r["jobs_per_second"],
             "x aibot (median)": r["vs_aibot_median"], "xacts/job": r["xacts_per_job"],
             "rows/job": r["rows_changed_per_job"],
             "cpu ms/job wrk": r["cpu_ms_per_job"]["workers"], "pg": r["cpu_ms_per_job"]["postgres"],
             "resp": r["cpu_ms_per_job"]["responder"]} for r in results]
    if rows:
        print(common.table(rows, list(rows[0]), title=f"overhead: {args.jobs} jobs, {args.processes}x{args.threads}"))
    if summary:
        srows = [{"system": k, "runs": v["runs"], "median jobs/s": v["jobs_per_second_median"], "x aibot": v["vs_aibot"]}
                 for k, v in summary.items()]
        print(common.table(srows, list(srows[0]), title="medians per system"))
    verdicts = {}
    if base:
        rate = base["jobs_per_second_median"]
        verdicts["target_1500_jobs_per_s"] = common.verdict(rate >= TARGET_JOBS_PER_S)
        if ceiling:
            verdicts["ahead_of_dramatiq_postgres_ceiling"] = common.verdict(rate > ceiling["jobs_per_second_median"])
        print(f"aibot {rate:.0f} jobs/s (median): >= {TARGET_JOBS_PER_S:.0f} jobs/s "
              f"{verdicts['target_1500_jobs_per_s']}" + (
                  f"; x{rate / ceiling['jobs_per_second_median']:.2f} the dramatiq-postgres no-op ceiling "
                  f"({verdicts['ahead_of_dramatiq_postgres_ceiling']})" if ceiling else ""))
        print("aibot jobs per worker process: " + ", ".join(str(r["jobs_per_process"]) for r in results
                                                            if r["system"] == "aibot"))
        if first_aibot.get("py_spy"):
            print(f"aibot workers, py-spy samples ({first_aibot['py_spy']['samples']}):")
            for k, v in first_aibot["py_spy"]["share"].items():
                print(f"  {v * 100:5.1f} %  {k}")
        for r in results:
            st = r.get("server_statements")
            if not st:
                continue
            print(f"{r['run']}: server statements per job {st['statements_per_job']}, transactions per job "
                  f"{st['transactions_per_job']} (log_statement; includes this script's progress polls)")
            for k, v in st["transactions_by_first_statement"].items():
                print(f"  {v:6.3f} transactions/job  {k}")
    if profile:
        print(f"\nround trips per aibot job (one thread, in-process, {profile['jobs']} jobs): "
              f"{profile['round_trips_per_job']}  ({profile['single_thread_ms_per_job']} ms/job single-threaded)")
        print(f"  waiting on Postgres {profile['db_wait_ms_per_job']} ms/job, the rest (Python: HTTP, JSON, "
              f"logging, pool) {profile['python_ms_per_job']} ms/job; client CPU {profile['client_cpu_ms_per_job']} "
              f"ms/job; one HTTP generation costs {profile['http_chat_cpu_ms_per_call']} ms (chat) / "
              f"{profile['http_stream_cpu_ms_per_call']} ms (chat_stream, the worker's default)")
        for k, v in profile["by_statement"].items():
            print(f"  {v:6.2f} round trips  {profile['wait_ms_per_job_by_statement'][k]:7.3f} ms/job  {k.splitlines()[0]}")

    doc = {"config": {"jobs": args.jobs, "warmup": args.warmup, "processes": args.processes, "threads": args.threads,
                      "sink": args.sink, "entities": args.entities, "backend": "loopback OpenAI-compatible responder"},
           "versions": harness.package_versions("dramatiq", "dramatiq-postgres", "procrastinate", "pgqueuer", "psycopg",
                                                "psycopg-pool"),
           "target": {"met": bool(base) and verdicts.get("target_1500_jobs_per_s") == "met"
                      and verdicts.get("ahead_of_dramatiq_postgres_ceiling", "met") == "met",
                      "jobs_per_second": TARGET_JOBS_PER_S, "and": "ahead of the dramatiq-postgres no-op"},
           "target_jobs_per_second": TARGET_JOBS_PER_S, "verdicts": verdicts, "summary": summary, "results": results,
           "round_trips": profile}
    common.write_json(args.output_dir, NAME, doc)
    if results and not args.no_plot:
        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            labels = list(summary)
            vals = [summary[k]["jobs_per_second_median"] for k in labels]
            bars = ax.bar(labels, vals, color=["#2c7fb8" if lbl == "aibot" else "#9ecae1" for lbl in labels])
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
            ax.axhline(TARGET_JOBS_PER_S, color="#d95f0e", linestyle="--", linewidth=1)
            ax.annotate(f"target {TARGET_JOBS_PER_S:,.0f}/s", (len(labels) - 0.5, TARGET_JOBS_PER_S), ha="right",
                        va="bottom", color="#d95f0e", fontsize=9)
            for i, k in enumerate(labels):
                ax.scatter([i] * len(summary[k]["jobs_per_second_all"]), summary[k]["jobs_per_second_all"],
                           color="#636363", s=10, zorder=3)
            ax.set_ylabel("jobs per second, median (dots: each run)")
            ax.tick_params(axis="x", labelsize=7, rotation=15)
            ax.set_title(f"Dispatch overhead, zero-latency backend: {args.jobs:,} jobs per run, {args.processes}x"
                         f"{args.threads} workers, same Postgres, one run", fontsize=10)
        common.save_plot(args.output_dir, NAME, draw, size=(9, 4.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
