"""Smoke tests of the speed-up benchmarks: each script runs end to end with tiny parameters, writes its
JSON, and its results say what the product guarantees (never timing: this machine is too noisy).

Each benchmark creates and drops its own scratch database on the test server. The scheduler's ticks
are shortened through the environment (as the e2e tests do) so cold loads need not wait for the
default 30 s rebalance; the benchmarks' own defaults are untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aibot.harness import FAST_SCHEDULES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, pg_server: str, out: Path, *args: str, timeout: float = 240) -> dict:
    env = {**os.environ, **FAST_SCHEDULES}
    env.pop("AIBOT_DATABASE_URL", None)       # the script must use --database-url, nothing else
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--database-url", pg_server,
                           "--output-dir", str(out), "--no-plot", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    path = out / f"{script}.json"
    assert path.exists(), f"{script} wrote no {path}"
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == script
    assert doc["host"]["nproc"] >= 1 and doc["command"]
    assert "target" in doc and "met" in doc["target"]
    assert "target:" in proc.stdout, proc.stdout
    return doc


def test_seed_scenarios(pg_server, tmp_path):
    doc = run("seed_scenarios", pg_server, tmp_path, "--counts", "1,13", "--speed", "0.05", "--reps", "1",
              "--seed-speed", "0")
    assert doc["total_slots"] == 12, doc["slots"]            # 6 models x 1 slot x 2 servers (seed formula)
    by = {(r["mode"], r["messages"]): r for r in doc["runs"]}
    assert set(by) == {("aibot", 1), ("aibot", 13), ("sequential", 1), ("sequential", 13)}
    assert by[("sequential", 13)]["peak_in_flight"] == 1     # the baseline really is one at a time
    assert 1 < by[("aibot", 13)]["peak_in_flight"] <= 12     # aibot runs in parallel, never past its slots
    assert by[("aibot", 13)]["rounds"] == 2


def test_saturation(pg_server, tmp_path):
    doc = run("saturation", pg_server, tmp_path, "--jobs", "60", "--speed", "0.05")
    r = doc["result"]
    assert r["slots"] == 24 and r["jobs"] == 60
    assert r["job_states"] == {"done": 66}                   # 60 + 6 warm-up, each answered once
    assert 0 < r["slot_utilisation"] <= 1
    assert max(point[1] for point in doc["in_flight_curve"]) <= 24


def test_dispatch_latency(pg_server, tmp_path):
    doc = run("dispatch_latency", pg_server, tmp_path, "--jobs", "20", "--rate", "20", "--stages")
    r = doc["result"]
    assert r["messages"] == 20 and len(doc["latencies_ms"]) == 20
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["peak_in_flight"] <= r["slots"]
    # Every message is split into stages or counted as served without a wake-up; the workers' stamps
    # were found (an HTTP stage for every message) and no stage is negative.
    stages = doc["stages"]["stages"]
    assert stages["ingest"]["messages"] == 20 and stages["http"]["messages"] == 20
    assert stages["wake-up"]["messages"] + doc["stages"]["without_wakeup"] == 20
    assert stages["wake-up"]["messages"] > 0
    assert all(v["p50_ms"] is None or v["p50_ms"] >= 0 for v in stages.values())


def test_memory_safety(pg_server, tmp_path):
    doc = run("memory_safety", pg_server, tmp_path, "--per-model", "4", "--window", "15")
    rows = {(r["scenario"][:1], r["dispatcher"]): r for r in doc["results"]}
    for key, r in rows.items():
        if key[1] == "aibot":
            assert not r["exceeded"] and r["peak_gb"] <= r["budget_gb"], r
    assert doc["target"]["met"] is True
    assert rows[("B", "aibot")]["peak_generating"] <= 6     # six slots on 128 GB with six models
    assert rows[("B", "aibot")]["replies"] == 24
    # 24 messages, 20 naive threads: far more than six generate at once next to 90 GB of models.
    assert rows[("B", "naive")]["peak_generating"] > 6


def test_load_storm(pg_server, tmp_path):
    doc = run("load_storm", pg_server, tmp_path, "--requests", "12")
    by = {r["dispatcher"]: r for r in doc["results"]}
    assert by["aibot"]["loads"] == 1 and by["aibot"]["answered"] == 12
    assert by["JIT race (direct)"]["loads"] > 1
    assert doc["target"]["met"] is True


def test_swap_thrash(pg_server, tmp_path):
    doc = run("swap_thrash", pg_server, tmp_path, "--duration", "6", "--rate", "2", "--drain", "5")
    by = {r["dispatcher"]: r for r in doc["results"]}
    assert by["aibot"]["requests"] == by["FIFO"]["requests"] == 12
    assert by["FIFO"]["loads"] >= 2                           # B and C alternate: FIFO must swap
    for r in by.values():
        assert r["peak_memory_gb"] <= 56


def test_run_all_skips_missing_and_reports(pg_server, tmp_path):
    env = {**os.environ, **FAST_SCHEDULES}
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--database-url", pg_server, "--quick",
                           "--no-plot", "--output-dir", str(tmp_path), "--only", "dispatch_latency"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dispatch_latency" in proc.stdout and "All benchmarks" in proc.stdout
    assert (tmp_path / "dispatch_latency.json").exists()
    bad = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nonsense"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nonsense" in bad.stderr


def test_bad_arguments_name_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "seed_scenarios.py"), "--counts", "1,x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--counts" in proc.stderr
