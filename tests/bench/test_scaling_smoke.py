"""bench/scaling.py end to end with tiny parameters on the test server: it must build each point it
says it built, measure claims that really claimed, check plans, and drop its database. Never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.timeout(300)


def test_scaling_quick_run(pg_server, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scaling.py"), "--database-url", pg_server, "--output-dir", str(tmp_path),
         "--no-plot", "--quick", "--max-jobs", "2000", "--sweeps", "depth,servers,blocked",
         "--servers", "2,6", "--latency-claims", "10", "--throughput-jobs", "40", "--threads", "2"],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target:" in proc.stdout
    doc = json.loads((tmp_path / "scaling.json").read_text())
    points = doc["points"]
    assert [p["queued"] for p in points if p["sweep"] == "depth"] == [1000]     # 10k is above --max-jobs
    assert [(p["servers"], p["slot_rows"]) for p in points if p["sweep"] == "servers"] == [(2, 12), (6, 36)]
    assert [p["x"] for p in points if p["sweep"] == "blocked"] == [0]
    for p in points:
        assert p["latency"]["claims"] == 10 and p["latency"]["empty"] == 0, p
        assert p["throughput"]["jobs"] > 0
        assert p["plan"]["statements"], p["plan"]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        left = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'aibot_bench_scaling_%'").fetchall()
    assert left == []
