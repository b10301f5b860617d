"""Every `aibot` subcommand rejects bad arguments with a usage message and a non-zero exit code.

The subcommands are discovered from the parser itself, so a new command is covered without editing
this file. Argument errors (argparse) exit 2 with `usage:`; value errors the command finds itself
(CliError) exit 2 with `aibot <command>: error: <what>`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from aibot.cli import build_parser, main

pytestmark = pytest.mark.timeout(120)


def leaf_commands() -> list[tuple[list[str], list[str]]]:
    """(command words, names of its required positionals) for every runnable subcommand."""
    out = []

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + [name])
                return
        positionals = [a.dest for a in parser._actions
                       if not a.option_strings and a.dest != "help" and a.nargs not in ("?", "*")]
        out.append((words, positionals))

    walk(build_parser(), [])
    return out


LEAVES = leaf_commands()


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_every_command_is_sampled():
    names = {" ".join(w) for w, _ in LEAVES}
    assert {"bot", "scheduler", "status", "jobs show", "servers drain", "serve", "sim"} <= names, names


@pytest.mark.parametrize("words, positionals", LEAVES, ids=[" ".join(w) for w, _ in LEAVES])
def test_unknown_option_is_a_usage_error(words, positionals, capsys):
    code, err = run([*words, *["1"] * len(positionals), "--no-such-option"], capsys)
    assert code == 2, err
    assert "usage:" in err and "--no-such-option" in err


@pytest.mark.parametrize("words, positionals", [(w, p) for w, p in LEAVES if p], ids=[" ".join(w) for w, p in LEAVES if p])
def test_missing_positional_is_a_usage_error(words, positionals, capsys):
    code, err = run(words, capsys)
    assert code == 2 and "usage:" in err and "required" in err, err


@pytest.mark.parametrize("argv, expected", [
    (["jobs", "show", "not-a-number"], "invalid int value"),
    (["jobs", "list", "--limit", "many"], "invalid int value"),
    (["top", "--interval", "soon"], "'soon'"),
    (["bot", "--poll-interval", "fast"], "invalid float value"),
    (["bot", "--source", "carrier-pigeon"], "invalid choice"),
    ([], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_values_are_usage_errors(argv, expected, capsys):
    code, err = run(argv, capsys)
    assert code == 2 and expected in err and "usage:" in err, err


@pytest.mark.parametrize("argv, expected", [
    (["bot", "--once", "--batch-size", "0", "--database-url", "postgresql://x@127.0.0.1:1/x",
      "--config", "/nonexistent/config.json"], "config /nonexistent/config.json"),
    (["bot", "--once", "--start-at", "yesterday", "--chat-url", "http://127.0.0.1:9"], "--start-at"),
    (["config", "check", "/nonexistent/config.json"], "/nonexistent/config.json"),
])
def test_values_the_command_checks_itself_exit_non_zero_with_the_reason(argv, expected, capsys, tmp_path, monkeypatch):
    from aibot.harness import entity, write_config

    cfg = write_config(tmp_path / "c.json", servers=[{"name": "s", "url": "http://127.0.0.1:9"}],
                       entities=[entity("e", "m", rate_limits={"maxPostsPerMinute": 1})])
    monkeypatch.setenv("AIBOT_CONFIG", cfg)
    monkeypatch.setenv("AIBOT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    code, err = run(argv, capsys)
    assert code != 0, err
    assert expected in err, err
    assert "Traceback" not in err


def test_real_process_exit_code_and_usage_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "aibot", "jobs", "show", "1", "--bogus"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: aibot") and "unrecognized arguments: --bogus" in proc.stderr
