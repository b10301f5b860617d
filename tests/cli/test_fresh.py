"""A newcomer's first commands: every `aibot … --help`, and every read-only command the README documents,
without any database, on an empty (never migrated) database and on a freshly migrated one.

Through the real entry point (`python -m aibot`). None may print a traceback. A missing piece is one
line on stderr that names it and the fix (`set AIBOT_DATABASE_URL`, `run aibot migrate`), exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aibot.harness import entity, write_config
from tests.support import pg
from tests.cli.test_bad_input import LEAVES

pytestmark = pytest.mark.timeout(300)

ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")


def aibot(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aibot", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture
def clean_env(tmp_path):
    """The process environment of a fresh shell: no AIBOT_* variable, a config file of its own."""
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
    env["AIBOT_CONFIG"] = write_config(tmp_path / "config-aientities.json",
                                       servers=[{"name": "lm1", "url": "http://127.0.0.1:9", "kind": "lmstudio"}],
                                       entities=[entity("eve", "m", rate_limits={})])
    return env


@pytest.fixture
def empty_db(pg_server):
    name = pg.unique_name("aibot_empty")
    url = pg.create_database(pg_server, name)
    yield url
    pg.drop_database(pg_server, name)


MESSAGE = json.dumps({"id": "m1", "username": "ann", "text": "hello eve", "botParams": {"entity": "eve"}})

# (argv, needs the database, stdin). From the README's command table and "Running it for real".
READ_ONLY = [
    (["--version"], False, ""),
    (["config", "check"], False, ""),
    (["scheduler", "--list"], False, ""),
    (["enqueue", "--check"], False, MESSAGE + "\n"),
    (["migrate", "--dry-run"], True, ""),
    (["status"], True, ""),
    (["top", "--iterations", "1", "--interval", "0"], True, ""),
    (["jobs", "list"], True, ""),
    (["servers", "list"], True, ""),
    (["models", "list"], True, ""),
    (["plan", "--no-refresh"], True, ""),
    (["plan"], True, ""),                            # refreshes: the configured server is unreachable
    (["status", "--plain"], True, ""),
    (["models", "list", "--refresh"], True, ""),
    (["servers", "list"], True, ""),
]
IDS = [" ".join(a) for a, _, _ in READ_ONLY]


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aibot ") and ": error: " in lines[0], proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def test_every_help_works(clean_env, capsys):
    from aibot.cli import main

    for words, _ in [([], [])] + LEAVES:
        with pytest.raises(SystemExit) as exit_:
            main([*words, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith("usage: aibot"), (words, out)
    proc = aibot("jobs", "--help", env=clean_env)
    assert proc.returncode == 0 and "list" in proc.stdout and not proc.stderr


@pytest.mark.parametrize("argv, needs_db, stdin", READ_ONLY, ids=IDS)
def test_without_a_database(argv, needs_db, stdin, clean_env):
    proc = aibot(*argv, env=clean_env, stdin=stdin)
    no_traceback(proc)
    if needs_db:
        one_line_error(proc, "set AIBOT_DATABASE_URL")
    else:
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv, needs_db, stdin", READ_ONLY, ids=IDS)
def test_on_a_database_never_migrated(argv, needs_db, stdin, clean_env, empty_db):
    proc = aibot(*argv, env={**clean_env, "AIBOT_DATABASE_URL": empty_db}, stdin=stdin)
    no_traceback(proc)
    if needs_db and argv[0] != "migrate":
        one_line_error(proc, "aibot migrate")
    else:
        assert proc.returncode == 0, proc.stderr
    if argv[0] == "migrate":
        assert "pending" in proc.stdout


@pytest.mark.parametrize("argv, needs_db, stdin", READ_ONLY, ids=IDS)
def test_on_a_freshly_migrated_database(argv, needs_db, stdin, clean_env, db_url):
    proc = aibot(*argv, env={**clean_env, "AIBOT_DATABASE_URL": db_url}, stdin=stdin)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr


def test_unreachable_database_is_one_line(clean_env):
    proc = aibot("status", env={**clean_env, "AIBOT_DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/none"})
    no_traceback(proc)
    one_line_error(proc, "127.0.0.1")
    assert "pw" not in proc.stderr.replace("password", "")


def test_a_bug_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from aibot.cli import main
    from aibot.ops import inspection

    def broken(*a, **kw):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspection, "status_snapshot", broken)
    monkeypatch.setattr("aibot.cli.status_cmd.open_db", lambda url: ("postgresql://x@127.0.0.1/x", _NoConn()))
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "aibot status: error: unexpected ZeroDivisionError: a bug (rerun with --debug for the traceback)"
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "status"])


class _NoConn:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the README, as a newcomer reads it ---------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_test_command() -> str:
    """The line `.ci/run` runs: the first line starting with 'pip install' after "Run the tests"."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Run the tests"))
    return next(line for line in lines[start:] if line.startswith("pip install"))


def test_readme_test_command_needs_nothing_running():
    cmd = readme_test_command()
    assert "AIBOT_TEST_DATABASE_URL" not in cmd, "the command must not point at a Postgres that may not run"
    extras = cmd.split("'")[1]
    assert "embedded" in extras and "test" in extras, extras
    ci = (README.parent / ".ci" / "run").read_text()
    assert "Run the tests" in ci and 'bash -c "$cmd"' in ci, ".ci/run runs the README's command"


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_walkthrough_config_and_enqueue_examples_work(tmp_path, clean_env):
    [config] = [textwrap.dedent(b) for b in _code_blocks(r"\s*json") if "lmStudioServers" in b]
    path = tmp_path / "config-aientities.json"
    path.write_text(config)
    env = {**clean_env, "AIBOT_CONFIG": str(path)}
    check = aibot("config", "check", env=env)
    assert check.returncode == 0 and "error" not in check.stdout.lower().replace("0 error", ""), check.stdout
    examples = [line.strip() for block in _code_blocks(r"\s*sh") for line in block.splitlines()
                if line.strip().startswith("echo '") and "aibot enqueue" in line]
    assert len(examples) >= 2
    for example in examples:
        message = example.split("'")[1]
        proc = aibot("enqueue", "--check", env=env, stdin=message + "\n")
        assert proc.returncode == 0, proc.stderr
        assert "would be: 1 new, 0 duplicate, 0 rejected, 0 ignored" in proc.stdout, proc.stdout


def test_every_read_only_command_the_readme_shows_is_run_above():
    """A command the README shows (in a shell block or its command table) that only reads is in READ_ONLY,
    so the three database states above run it as documented."""
    read_only = {("status",), ("top",), ("plan",), ("jobs", "list"), ("servers", "list"), ("models", "list"),
                 ("config", "check"), ("scheduler", "--list"), ("migrate", "--dry-run"), ("jobs", "show")}
    text = README.read_text()
    shown = set()
    for line in "\n".join(_code_blocks(r"\s*sh")).splitlines() + re.findall(r"`(aibot [^`]+)`", text):
        words = line.strip().split("#")[0].split()
        if "aibot" not in words:
            continue
        words = words[words.index("aibot") + 1:]
        for n in (2, 1):
            if tuple(words[:n]) in read_only:
                shown.add(tuple(words[:n]))
                break
    covered = {tuple(a[:2]) for a, _, _ in READ_ONLY} | {tuple(a[:1]) for a, _, _ in READ_ONLY} | {("jobs", "show")}
    assert shown and shown <= covered, shown - covered


def test_jobs_show_of_an_unknown_job_is_one_line(clean_env, db_url):
    proc = aibot("jobs", "show", "999999", env={**clean_env, "AIBOT_DATABASE_URL": db_url})
    no_traceback(proc)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "999999" in proc.stderr, proc.stderr


def test_an_older_schema_is_one_line_naming_the_missing_migration(clean_env, db_url, conn):
    """A database migrated by an older aibot (here: without the newest migration recorded) is refused before
    the command does anything, naming what is missing and the fix."""
    newest = conn.execute("SELECT version, name FROM aibot.migrations ORDER BY version DESC LIMIT 1").fetchone()
    conn.execute("DELETE FROM aibot.migrations WHERE version = %s", (newest["version"],))
    proc = aibot("plan", env={**clean_env, "AIBOT_DATABASE_URL": db_url})
    no_traceback(proc)
    one_line_error(proc, "lacks 1 migration(s)", newest["name"], "aibot migrate")
