"""bench/doorbell_scaling.py with tiny parameters: the new view and the statements it replaced must
give the same answers in every state it builds (the script refuses to time two reads that
disagree), and its scratch database is dropped. Never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.timeout(300)


def test_doorbell_scaling_quick_run(pg_server, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "doorbell_scaling.py"), "--database-url", pg_server, "--output-dir",
         str(tmp_path), "--max-jobs", "2000", "--reads", "3"],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "doorbell_scaling.json").read_text())
    answers = {(p["queued"], p["state"]): (p["new"]["answer"], p["previous"]["answer"]) for p in doc["points"]}
    # 2 servers x 6 models, one slot each: all free, all busy, busy with work for a model held nowhere.
    assert answers == {(1000, "free"): ([12, 12], [12, 12]), (1000, "busy"): ([0, 0], [0, 0]),
                       (1000, "unplaced"): ([0, 1], [0, 1])}
    with psycopg.connect(pg_server, autocommit=True) as admin:
        left = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'aibot_bench_doorbell_%'").fetchall()
    assert left == []
