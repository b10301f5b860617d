"""`aibot demo`: the pure pieces (workload, baseline, sizing, report, progress, data directory), and real
runs of the command against a test database and an embedded PostgreSQL, checking that every message is
answered exactly once and that no process outlives the demo."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from aibot import db
from aibot.cluster import sizing
from aibot.demo import baseline, capacity, report
from aibot.demo.embedded import default_pgdata, live_pids, prune_handle_pids
from aibot.demo.progress import Display, ServerLine, Snapshot, render_block, render_line, replies_per_minute
from aibot.demo.run import DemoError, DemoOptions
from aibot.demo.users import DEMO_ENTITIES, arrival_times, demo_entity_configs, message_count, plan_messages
from aibot.sim import SimConfig
from tests.support.waiting import wait_for

GB = 10**9
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ data directory

def test_pgdata_for_a_user_follows_xdg_then_local_share():
    assert default_pgdata({"XDG_DATA_HOME": "/x/data"}, 1000, "/home/u") == Path("/x/data/aibot/pgdata")
    assert default_pgdata({}, 1000, "/home/u") == Path("/home/u/.local/share/aibot/pgdata")


def test_pgdata_for_root_stays_out_of_root_home():
    assert default_pgdata({}, 0, "/root", writable=lambda p, m: True) == Path("/var/lib/aibot/pgdata")
    assert default_pgdata({}, 0, "/root", writable=lambda p, m: False) == Path("/tmp/aibot-pgdata")
    assert default_pgdata({"AIBOT_DEMO_PGDATA": "/srv/pg"}, 0, "/root") == Path("/srv/pg")


def test_dead_handle_pids_are_pruned(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    (tmp_path / ".handle_pids.json").write_text(json.dumps([dead, os.getpid()]))
    assert prune_handle_pids(tmp_path) == [dead]
    assert json.loads((tmp_path / ".handle_pids.json").read_text()) == [os.getpid()]
    assert live_pids("garbage") == [] and live_pids([True, "1", os.getpid()]) == [os.getpid()]


# ----------------------------------------------------------------------------------------- workload

def test_workload_is_reproducible_and_mixed():
    a = plan_messages(7, 200, 60.0)
    assert a == plan_messages(7, 200, 60.0)
    assert a != plan_messages(8, 200, 60.0)
    assert len(a) == 200
    assert [m.at for m in a] == sorted(m.at for m in a) and 0 <= a[0].at and a[-1].at < 60
    ids = {e[0] for e in DEMO_ENTITIES}
    assert {m.entity for m in a} == ids, "every entity gets traffic"
    assert any(m.ais and m.ais.endswith(":random") for m in a) and any(m.ais and ":random" not in m.ais for m in a)
    assert sum(m.context is not None for m in a) > 50
    assert {m.priority for m in a} == {None, 5, 20, 80}


def test_arrivals_look_like_a_poisson_process():
    times = arrival_times(random.Random(3), 2000, 100.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    assert 0.045 < mean < 0.055
    # exponential gaps: the standard deviation is close to the mean (uniform spacing would give 0)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert 0.8 < sd / mean < 1.2


def test_message_count_and_option_errors_name_the_option():
    assert message_count(None, 60) == 150
    assert message_count(30, 60) == 30
    with pytest.raises(ValueError, match="--messages"):
        message_count(0, 60)
    with pytest.raises(ValueError, match="--duration"):
        message_count(None, 0)
    with pytest.raises(DemoError, match="--speed"):
        DemoOptions(speed=0).validate()


def test_demo_entities_keep_the_simulators_three_second_replies():
    assert all(e["maxTokens"] >= SimConfig().reply_tokens for e in demo_entity_configs())


# ----------------------------------------------------------------------------------------- baseline

def test_a_reply_alone_takes_about_three_seconds_and_a_cold_load_thirty():
    t = baseline.Timing.from_sim_config(SimConfig())
    assert t.service_seconds(0, 110) == pytest.approx(2.95)
    assert t.load_seconds(15 * GB) == pytest.approx(30.5)
    half = baseline.Timing.from_sim_config(SimConfig(speed=0.5))
    assert half.service_seconds(100, 110) == pytest.approx(0.5 * t.service_seconds(100, 110))


def test_original_prompt_is_one_message_with_the_context_and_the_trigger_line():
    short = baseline.original_prompt_tokens("You are x.", "Reply.", [], "ada", "hello there")
    longer = baseline.original_prompt_tokens("You are x.", "Reply.", ["bo: one two three"], "ada", "hello there")
    assert longer - short == 5       # "bo", ":", "one", "two", "three"
    assert short == 4 + len("You are x . Reply . Context : ada : hello there".split())   # + 4 for role framing


def test_sequential_worker_serves_by_priority_then_age_and_pays_loads():
    jobs = [baseline.SeqJob(0.0, 50, "a", 1.0), baseline.SeqJob(0.0, 5, "b", 1.0),
            baseline.SeqJob(0.5, 50, "a", 1.0), baseline.SeqJob(10.0, 50, "b", 2.0)]
    loads = {"a": 3.0, "b": 4.0}
    switch = baseline.simulate_sequential(jobs, loads, policy="switch")
    # t=0: b (priority 5) loads 4 + 1 → 5; a loads 3 + 1 → 9; a (already loaded) → 10; b loads 4 + 2 → 16
    assert switch.makespan == pytest.approx(16.0)
    assert switch.loads == 3 and switch.load_seconds == pytest.approx(11.0) and switch.service_seconds == 5.0
    assert switch.waits == pytest.approx((8.0, 4.0, 8.5, 4.0))
    warm = baseline.simulate_sequential(jobs, loads, policy="warm")
    # same order, but b stays loaded: the last job starts at 10 with no load → 12
    assert warm.makespan == pytest.approx(12.0) and warm.loads == 2


def test_sequential_worker_idles_until_the_next_arrival():
    run = baseline.simulate_sequential([baseline.SeqJob(0, 1, "a", 1.0), baseline.SeqJob(100, 1, "a", 1.0)],
                                       {"a": 0.0}, policy="warm", initially_loaded=["a"])
    assert run.makespan == pytest.approx(101.0) and run.loads == 0


def test_sequential_worker_rejects_bad_input():
    with pytest.raises(ValueError, match="policy"):
        baseline.simulate_sequential([], {}, policy="magic")
    with pytest.raises(ValueError, match="no load time for model"):
        baseline.simulate_sequential([baseline.SeqJob(0, 1, "zz", 1.0)], {})
    assert baseline.simulate_sequential([], {}).makespan == 0


# ----------------------------------------------------------------------------------------- capacity

def test_workers_are_sized_for_the_most_slots_the_seed_cluster_can_have():
    a = capacity.server_ceiling("mac-studio-1", sizing.Budget(128 * GB), [15 * GB] * 6, 1)
    b = capacity.server_ceiling("mac-studio-2", sizing.Budget(128 * GB), [15 * GB] * 6, 4)
    assert (a.slots, a.models) == (6, 6)           # the seed's "workers = loaded models"
    assert (b.slots, b.models) == (12, 3)          # the hard cap, reached with 3 models × parallel 4
    two = capacity.choose_workers([a, b], cpu_count=2)
    assert (two.total_slots, two.processes, two.threads) == (18, 2, 9)
    assert two.processes * two.threads >= two.total_slots
    assert "--processes 2 --threads 9" in two.command and "aibot plan" in two.explain()
    one = capacity.choose_workers([a, b], cpu_count=1)
    assert (one.processes, one.threads) == (1, 18)


# ------------------------------------------------------------------------------------------- report

def test_percentile_interpolates_like_postgres():
    assert report.percentile([], 50) is None
    assert report.percentile([4.0], 95) == 4.0
    assert report.percentile([1, 2, 3, 4], 50) == 2.5
    assert report.percentile(list(range(101)), 95) == 95
    with pytest.raises(ValueError):
        report.percentile([1], 101)


def test_available_slot_seconds_is_a_step_function_clipped_to_the_window():
    samples = [report.SlotSample(0, 0), report.SlotSample(10, 4), report.SlotSample(20, 6)]
    assert report.available_slot_seconds(samples, 0, 30) == pytest.approx(0 * 10 + 4 * 10 + 6 * 10)
    assert report.available_slot_seconds(samples, 15, 25) == pytest.approx(4 * 5 + 6 * 5)
    assert report.available_slot_seconds(samples, 5, 5) == 0


def _records():
    posted = [report.PostRecord("m1", "e", 1_000_000), report.PostRecord("m2", "e", 1_001_000),
              report.PostRecord("m3", "e", 1_002_000)]
    jobs = [report.JobRecord(1, "m1", "e", "a", "done", 50, 1000.2, 1001.0, 1003.0, "s1", 1),
            report.JobRecord(2, "m2", "e", "a", "done", 50, 1001.2, 1003.0, 1005.0, "s1", 1),
            report.JobRecord(3, "m3", "e", "a", "dead", 50, 1002.2, None, 1004.0, None, 3),
            report.JobRecord(4, "other", "e", "a", "done", 50, 900.0, 901.0, 902.0, "s1", 1)]
    replies = [report.ReplyRecord("m1", 1_003_000), report.ReplyRecord("m2", 1_005_000),
               report.ReplyRecord("m2", 1_005_500), report.ReplyRecord("not-ours", 1_009_000)]
    servers = [report.ServerRecord("s1", 4, 128 * GB, 60 * GB, {"a": 1, "b": 0}, 3),
               report.ServerRecord("s2", 1, 100 * GB, 101 * GB, {"a": 1}, 1)]
    samples = [report.SlotSample(1000.0, 2)]
    seq = baseline.SequentialRun("switch", 11.0, 1, 3.0, 6.0, (0.0, 1.0, 2.0))
    return dict(posted=posted, jobs=jobs, replies=replies, servers=servers, samples=samples, baseline=[seq])


def test_report_counts_exactly_once_duplicates_and_unanswered():
    r = report.build_report(**_records(), speed=1.0, seed=1)
    assert (r.posted, r.replies, r.answered_once, r.answered_twice_or_more, r.unanswered) == (3, 3, 1, 1, 1)
    assert not r.all_answered_exactly_once
    assert r.job_states == {"dead": 1, "done": 2}     # the job of a message not posted by the demo is ignored
    assert r.p50_wait_seconds == pytest.approx(1.3)   # waits 0.8 and 1.8
    assert r.p50_latency_seconds == pytest.approx(3.5)  # 3.0 and 4.0 (first reply of m2)
    assert r.makespan_seconds == pytest.approx(5.5)     # 1000.0 → 1005.5
    assert r.replies_per_minute == pytest.approx(3 / 5.5 * 60)
    assert r.busy_slot_seconds == pytest.approx(4.0)
    assert r.available_slot_seconds == pytest.approx(11.0)
    assert r.slot_utilisation == pytest.approx(4 / 11)
    assert r.loads_per_model == {"a": {"s1": 1, "s2": 1}}
    assert r.baseline[0].speedup == pytest.approx(2.0)
    assert any("s2: peak RAM" in n for n in r.notes) and any("more than once" in n for n in r.notes)
    text = report.format_report(r)
    assert "NOT every message answered exactly once" in text and "2.0×" in text
    assert json.loads(report.to_json(r))["answered_once"] == 1


def test_report_of_a_clean_run_says_so():
    rec = _records()
    rec["posted"] = rec["posted"][:2]
    rec["replies"] = rec["replies"][:2]
    r = report.build_report(**rec, speed=0.01, seed=3)
    assert r.all_answered_exactly_once and r.unanswered == 0
    assert "every message answered exactly once" in report.format_report(r)
    assert report.secs(0.0345) == "34ms" and report.secs(75) == "1m15s" and report.secs(None) == "-"


# ----------------------------------------------------------------------------------------- progress

def _snap(**kw):
    server = ServerLine("mac-studio-1", {"sim/model-1@f16": 1, "sim/model-2@f16": 0}, 1, 6, 45 * GB, 128 * GB, 3, 1)
    base = dict(elapsed=12.5, phase="posting", posted=10, planned=150, states={"queued": 4, "done": 6, "running": 1},
                runnable=3, replies=6, replies_per_minute=28.8, servers=(server,))
    return Snapshot(**{**base, **kw})


def test_progress_shows_queue_in_flight_ram_and_loads():
    block = "\n".join(render_block(_snap()))
    assert "posted 10/150" in block and "queued 4, running 1, done 6" in block and "runnable 3" in block
    assert "slots 1/6, generating model-1@f16:1;" in block and "RAM 45.0GB/128.0GB" in block
    assert "loads 3 (+1 loading)" in block
    line = render_line(_snap())
    assert "\n" not in line and "mac-studio-1 1/6 slots, 1 gen" in line and "loads 3+1" in line


def test_replies_per_minute_uses_the_time_so_far_before_a_full_minute():
    assert replies_per_minute([1.0, 2.0, 3.0], now=10.0, started=0.0) == pytest.approx(18.0)
    assert replies_per_minute([1.0, 100.0, 110.0], now=120.0, started=0.0) == pytest.approx(2.0)


def test_display_redraws_in_place_on_a_terminal_and_appends_lines_otherwise():
    tty = io.StringIO()
    d = Display(tty, tty=True)
    d.show(_snap())
    d.say("a message above the block")
    d.show(_snap(phase="draining"))
    d.close()
    drawn = tty.getvalue()
    assert "\x1b[2K" in drawn and "\x1b[1A" in drawn, "rich's Live moves the cursor up and clears lines"
    assert drawn.index("a message above the block") < drawn.rindex("draining")
    plain = io.StringIO()
    Display(plain, tty=False).show(_snap())
    assert plain.getvalue().count("\n") == 1 and "\x1b" not in plain.getvalue()


def test_report_of_a_stopped_run_says_what_it_could_not_compute():
    rec = _records()
    rec["replies"] = []
    rec["servers"] = [report.ServerRecord("s1", 4, 128 * GB, 60 * GB, {}, 0, loading=2)]
    r = report.build_report(**{**rec, "baseline": [baseline.SequentialRun("switch", 0.0, 0, 0.0, 0.0, ())]},
                            speed=1.0, seed=1)
    text = report.format_report(r)
    assert "2 load(s) were still running when the run stopped" in text
    assert "models were already loaded" not in text
    assert "not computed: no message was answered" in text and "aibot is - faster" not in text
    r2 = report.build_report(**{**_records(), "servers": [report.ServerRecord("s1", 4, 128 * GB, 60 * GB, {"a": 1}, 1,
                                                                              loading=1)]}, speed=1.0, seed=1)
    assert "(+1 load(s) still running when the run stopped)" in report.format_report(r2)
    assert "makespan 0ms" not in text


def test_demo_entities_are_not_rate_limit_warnings(tmp_path):
    from aibot.config.loader import check_config
    from aibot.demo.users import demo_entity_configs
    from aibot.harness import write_config

    path = write_config(tmp_path / "c.json", servers=[{"name": "s", "url": "http://127.0.0.1:1", "kind": "lmstudio"}],
                        entities=demo_entity_configs())
    result = check_config(path)
    assert not result.errors
    assert not [w for w in result.warnings if "rateLimits" in str(w)], result.warnings


# ---------------------------------------------------------------------------------------- real runs

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIBOT_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


class DemoProcess:
    """`aibot demo` as a subprocess; records every descendant it ever had, and its output lines."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen([sys.executable, "-m", "aibot", *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.descendants: dict[int, float] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)

    def sample(self) -> None:
        try:
            for child in psutil.Process(self.popen.pid).children(recursive=True):
                try:
                    self.descendants.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def wait(self, timeout: float) -> int:
        def finished():
            self.sample()
            return self.popen.poll() is not None
        try:
            wait_for(finished, timeout=timeout, interval=0.05, message="aibot demo to exit")
        except AssertionError:
            raise AssertionError("demo did not exit:\n" + self.output()[-5000:]) from None
        self._reader.join(5)
        return self.popen.returncode

    def __enter__(self) -> DemoProcess:
        return self

    def __exit__(self, *exc) -> None:
        """A failed test must not leave the demo running: SIGTERM is its "stop now"."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()

    def output(self) -> str:
        return "".join(self.lines)

    def survivors(self) -> list[int]:
        alive = []
        for pid, created in self.descendants.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive


@pytest.mark.timeout(120)
def test_demo_against_a_test_database_answers_every_message_once_and_leaves_nothing(db_url, tmp_path):
    out = tmp_path / "report.json"
    demo = DemoProcess(["demo", "--speed", "0.01", "--messages", "30", "--seed", "5", "--interval", "0.5",
                        "--keep-logs", "--json", str(out)], _env(AIBOT_DATABASE_URL=db_url))
    with demo:
        rc = demo.wait(100)
    text = demo.output()
    assert rc == 0, text[-5000:]
    # The log folder it names is there (--keep-logs), and its own config made no noise in it.
    logs = Path(re.search(r"logs in (\S+) \(kept\)", text).group(1))
    try:
        assert f"Logs kept in {logs}" in text and logs.is_dir()
        noise = "".join(f.read_text(errors="replace") for f in logs.iterdir() if f.is_file())
        assert "aibot bot" in text and noise, "the processes' logs were written"
        for line in ("rateLimits", "maximum number of running instances", " object at 0x"):
            assert line not in noise, [x for x in noise.splitlines() if line in x][:3]
    finally:
        shutil.rmtree(logs.parent, ignore_errors=True)
    rep = json.loads(out.read_text())
    assert rep["posted"] == 30 and rep["answered_once"] == 30 and rep["all_answered_exactly_once"], rep
    assert rep["answered_twice_or_more"] == 0 and rep["unanswered"] == 0 and rep["job_states"] == {"done": 30}
    assert "every message answered exactly once" in text and "NOT every" not in text
    assert "Workers: at most 18 slots" in text and "--processes" in text
    assert rep["context"]["database"]["kind"] == "external"
    assert rep["context"]["processes"]["left_running"] == []
    assert len(demo.descendants) >= 3, "bot, dramatiq master and workers should have been seen"
    assert demo.survivors() == [], f"descendants still running: {demo.survivors()}"
    for s in rep["servers"]:
        assert s["within_budget"] and s["peak_ram_bytes"] <= s["budget_bytes"]
    assert sum(sum(by.values()) for by in rep["loads_per_model"].values()) >= 1
    assert {b["policy"] for b in rep["baseline"]} == {"switch", "warm"}
    assert all(b["speedup"] > 0 for b in rep["baseline"])
    with db.connect(db_url, autocommit=True) as conn:
        done = conn.execute("SELECT count(*) AS n FROM aibot.jobs WHERE state = 'done'").fetchone()["n"]
    assert done == 30


@pytest.mark.timeout(120)
def test_first_ctrl_c_stops_posting_drains_and_reports(db_url, tmp_path):
    out = tmp_path / "report.json"
    # 400 messages over 20 s of wall clock: still posting when the first replies arrive.
    demo = DemoProcess(["demo", "--speed", "0.05", "--duration", "400", "--messages", "400", "--interval", "0.2",
                        "--json", str(out)], _env(AIBOT_DATABASE_URL=db_url))
    with demo:
        def posting_and_answering():
            demo.sample()
            return any(" posting " in line and " replies 0 " not in line for line in demo.lines)
        wait_for(posting_and_answering, timeout=40, interval=0.05, message="the demo to post and answer")
        demo.popen.send_signal(signal.SIGINT)
        rc = demo.wait(90)
    text = demo.output()
    assert "Ctrl-C: stopped posting after" in text, text[-3000:]
    rep = json.loads(out.read_text())
    assert 0 < rep["posted"] < 400
    assert rep["all_answered_exactly_once"], text[-3000:]
    assert rc == 0
    assert rep["context"]["outcome"] == "interrupted"
    assert demo.survivors() == []


def test_demo_refuses_a_database_that_holds_a_deployment(db_url):
    with db.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO aibot.servers (name, url) VALUES ('prod-mac', 'http://10.0.0.1:1234')")
    done = subprocess.run([sys.executable, "-m", "aibot", "demo", "--speed", "0.01", "--messages", "3"], cwd=ROOT,
                          env=_env(AIBOT_DATABASE_URL=db_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "already holds 0 job(s) and 1 server(s)" in done.stderr and "empty database" in done.stderr


@pytest.fixture
def outside_pytest_tmp():
    """A directory outside pytest's basetemp: as root, postgres runs as the user `pgserver`, which must
    traverse the parents, and any concurrent pytest session resets /tmp/pytest-of-root to 0700, cutting
    a running server off from its data directory."""
    path = Path(tempfile.mkdtemp(prefix="aibot-demo-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_without_a_database_url_uses_embedded_postgres_and_stops_it(tmp_path, outside_pytest_tmp):
    pytest.importorskip("pgserver")
    pgdata = outside_pytest_tmp / "pgdata"
    out = tmp_path / "report.json"
    # PG* variables point libpq at the machine's own Postgres: the demo must not be lured there.
    demo = DemoProcess(["demo", "--speed", "0.01", "--messages", "20", "--interval", "0.5", "--json", str(out)],
                       _env(AIBOT_DEMO_PGDATA=str(pgdata), PGHOST="127.0.0.1", PGPORT="5432"))
    with demo:
        rc = demo.wait(150)
    text = demo.output()
    assert rc == 0, text[-5000:]
    assert "AIBOT_DATABASE_URL is not set, so the demo starts an embedded PostgreSQL" in text
    logs = Path(re.search(r"logs in (\S+) \(deleted at the end unless the run fails", text).group(1))
    assert not logs.exists() and "Logs kept" not in text
    rep = json.loads(out.read_text())
    database = rep["context"]["database"]
    assert database["kind"] == "embedded" and database["pgdata"] == str(pgdata)
    assert f"host={pgdata}" in database["url"] and "127.0.0.1" not in database["url"]
    assert rep["all_answered_exactly_once"] and rep["posted"] == 20
    assert database["stopped"] is True
    assert not psutil.pid_exists(database["postmaster_pid"]) or \
        psutil.Process(database["postmaster_pid"]).status() == psutil.STATUS_ZOMBIE
    assert not (pgdata / "postmaster.pid").exists(), "postgres did not shut down cleanly"
    assert demo.survivors() == [] and rep["context"]["processes"]["left_running"] == []


def test_backlog_utilisation_and_idle_capacity_count_only_their_moments():
    samples = [report.SlotSample(0, 4, busy=4, backlog=3), report.SlotSample(10, 4, busy=1, backlog=0),
               report.SlotSample(20, 4, busy=2, backlog=5, stranded=1), report.SlotSample(30, 4, busy=0, backlog=0)]
    # While a backlog existed (0-10 s and 20-30 s): busy 4·10 + 2·10 over 4·20 slot-seconds.
    assert report.backlog_utilisation(samples, 0, 40) == pytest.approx(60 / 80)
    assert report.stranded_seconds(samples, 0, 40) == pytest.approx(10)
    assert report.stranded_seconds(samples, 25, 40) == pytest.approx(5)
    assert report.backlog_utilisation([report.SlotSample(0, 4)], 0, 10) is None


def test_servable_utilisation_discounts_slots_of_models_nobody_waits_for():
    # 0-10 s: 6 slots, 2 held, the queued model has 2 slots (servable 2) -> all servable slots busy;
    # 10-20 s: servable 4, 1 held -> the workers left 3 usable slots idle beside the backlog.
    samples = [report.SlotSample(0, 6, busy=2, backlog=5, servable=2),
               report.SlotSample(10, 6, busy=1, backlog=2, servable=4), report.SlotSample(20, 6, busy=0, backlog=0)]
    assert report.backlog_utilisation(samples, 0, 30) == pytest.approx(3 / 12)
    assert report.backlog_servable_utilisation(samples, 0, 30) == pytest.approx((2 * 10 + 1 * 10) / (2 * 10 + 4 * 10))
    assert report.backlog_servable_utilisation([report.SlotSample(0, 4, backlog=1)], 0, 10) is None   # not sampled


def test_progress_names_models_queued_where_nothing_can_serve_them_yet():
    snap = Snapshot(3.0, "posting", 5, 10, {"queued": 4}, 4, 0, 0.0, (), (("sim/model-3@f16", 4),))
    assert "queued where nothing can serve them yet: model-3@f16 4" in "\n".join(render_block(snap))
    assert render_line(snap).endswith("unserved: model-3@f16 4")
    assert "unserved" not in render_line(Snapshot(3.0, "posting", 5, 10, {}, 0, 0, 0.0))
