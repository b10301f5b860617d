"""`aibot config check`: readable report, exit 1 on errors, 0 otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aibot.cli import main
from aibot.settings import reset_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "config-aientities.json"


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["config", "check", *args])
    return code, capsys.readouterr().out


def test_valid_file_exits_zero_with_summary(capsys):
    code, out = run(capsys, str(EXAMPLE))
    assert code == 0
    assert "OK: 0 error(s), 0 warning(s)" in out
    assert "ENTITIES (4, 3 enabled)" in out and "SERVERS (2, 1 enabled)" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("fear-and-loathing"))
    assert "fear-and-loathing@f16" in line and "30" in line and "5/min" in line
    assert "http://10.0.0.100:1234" in out and "120 GB" in out


def test_directory_exits_zero(capsys):
    code, out = run(capsys, str(ROOT / "examples" / "entities"))
    assert code == 0 and "(directory)" in out and "ultra-llama" in out and "AIBOT_ULTRA_TOKEN" in out


def test_errors_exit_one_and_name_path_and_value(tmp_path, capsys):
    raw = json.loads(EXAMPLE.read_text())
    raw["entities"][1]["color"] = "999999999"
    raw["entities"][0]["defaultPriority"] = 120
    raw["surprise"] = {"a": 1}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    code, out = run(capsys, str(path))
    assert code == 1
    assert "ERRORS (2)" in out and "WARNINGS (1)" in out
    prio = next(ln for ln in out.splitlines() if "entities[0].defaultPriority" in ln)
    assert "120" in prio and "the-eternal" in prio
    colour = next(ln for ln in out.splitlines() if "entities[1].color" in ln)
    assert "'999999999'" in colour
    assert any("surprise" in ln and "unknown key" in ln for ln in out.splitlines())
    assert "INVALID: 2 error(s), 1 warning(s)" in out


def test_warnings_alone_exit_zero(tmp_path, capsys):
    raw = json.loads(EXAMPLE.read_text())
    del raw["entities"][0]["rateLimits"]
    path = tmp_path / "warn.json"
    path.write_text(json.dumps(raw))
    code, out = run(capsys, str(path))
    assert code == 0 and "WARNINGS (1)" in out and "unlimited" in out


def test_invalid_json_and_missing_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"entities": [\n  {"id": "x"\n]}')
    code, out = run(capsys, str(path))
    assert code == 1 and "line 3, column 1" in out
    code, out = run(capsys, str(tmp_path / "absent.json"))
    assert code == 1 and "file not found" in out


def test_default_path_comes_from_settings(monkeypatch, capsys):
    monkeypatch.setenv("AIBOT_CONFIG", str(EXAMPLE))
    monkeypatch.delenv("AIBOT_SETTINGS_FILE", raising=False)
    reset_settings()
    try:
        code, out = run(capsys)
    finally:
        reset_settings()
    assert code == 0 and str(EXAMPLE) in out


def test_action_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        main(["config"])
    assert info.value.code == 2
