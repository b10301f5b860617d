"""What backslash-n in the config means: a newline by default, the two characters in literal mode."""

from __future__ import annotations

import json

import pytest

from aibot.config import load_config
from aibot.config.escapes import apply, unescape


@pytest.mark.parametrize(("text", "expected"), [
    ("a\\nb", "a\nb"),
    ("\\tindent", "\tindent"),
    ("back\\\\slash", "back\\slash"),
    ("\\\\n stays literal", "\\n stays literal"),  # escaped backslash, then the letter n
    ("\\x and \\u0041 untouched", "\\x and \\u0041 untouched"),
    ("real\nnewline", "real\nnewline"),
    ("trailing\\", "trailing\\"),
    ("", ""),
])
def test_unescape(text, expected):
    assert unescape(text) == expected


def test_literal_mode_changes_nothing():
    assert apply("a\\nb", "literal") == "a\\nb"
    assert apply("a\\nb", "unescape") == "a\nb"


def _config(tmp_path, **top):
    data = {
        **top,
        "globalSettings": {"globalStopSequences": ["\\nHuman:"], "globalTrimAfter": ["\\n"],
                           "globalFilterOut": ["\\tAI:"], **top.pop("globalSettings", {})},
        "entities": [{"id": "e", "username": "E", "color": "001002003", "model": "m",
                      "systemPrompt": "Line one.\\nLine two.", "userPrompt": "Go:\\n",
                      "filterOut": ["E:\\n"], "trimAfter": ["Human:", "\\n"], "stopSequences": ["\\nE:"],
                      "rateLimits": {}}],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return load_config(path)


def test_default_unescapes_every_text_field(tmp_path):
    config = _config(tmp_path)
    e = config.entity("e")
    assert config.escape_mode == "unescape"
    assert e.system_prompt == "Line one.\nLine two."
    assert e.user_prompt == "Go:\n"
    assert e.filter_out == ["E:\n"]
    assert e.trim_after == ["Human:", "\n"]
    assert e.stop_sequences == ["\nE:"]
    gs = config.global_settings
    assert gs.global_stop_sequences == ["\nHuman:"]
    assert gs.global_trim_after == ["\n"] and gs.global_filter_out == ["\tAI:"]


@pytest.mark.parametrize("where", ["top", "global"])
def test_literal_opt_out(tmp_path, where):
    config = _config(tmp_path, **({"escapes": "literal"} if where == "top"
                                  else {"globalSettings": {"escapes": "literal"}}))
    e = config.entity("e")
    assert config.escape_mode == "literal"
    assert e.system_prompt == "Line one.\\nLine two."
    assert e.trim_after == ["Human:", "\\n"]
    assert config.global_settings.global_stop_sequences == ["\\nHuman:"]


def test_contradicting_modes_are_an_error(tmp_path):
    from aibot.config import ConfigError

    with pytest.raises(ConfigError, match="contradicts"):
        _config(tmp_path, escapes="unescape", globalSettings={"escapes": "literal"})


def test_original_production_trim_after_means_newline():
    """The original's `"trimAfter": ["Human:", "\\\\n"]` now cuts at a real newline."""
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "config-aientities.json")
    assert config.entity("the-eternal").trim_after == ["Human:", "\n"]
    assert "\n" in config.entity("the-eternal").system_prompt
