"""Reply post-processing (aibot.generation.postprocess): pure, with hypothesis properties."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aibot.generation.postprocess import cap_utf16, clean_reply, cut_at_earliest, remove_phrases


def entity(filter_out=(), trim_after=(), trim_whitespace=True):
    return SimpleNamespace(filter_out=list(filter_out), trim_after=list(trim_after), trim_whitespace=trim_whitespace)


def glob(filter_out=(), trim_after=()):
    return SimpleNamespace(global_filter_out=list(filter_out), global_trim_after=list(trim_after),
                           global_stop_sequences=[])


def test_production_config_example():
    # The final production config: filterOut ["<Username>:", "Assitant:"], trimAfter ["Human:", "\n"].
    e = entity(filter_out=["Poet:", "Assitant:"], trim_after=["Human:", "\n"])
    assert clean_reply("Poet: Hello there!\nHuman: and you?", e, glob()) == "Hello there!"


def test_filter_is_case_sensitive_and_removes_every_occurrence():
    e = entity(filter_out=["um"], trim_whitespace=False)
    assert clean_reply("um, Um, umbrella um", e, glob()) == ", Um, brella "


def test_global_and_entity_lists_both_apply():
    e = entity(filter_out=["A"], trim_after=["STOP"])
    g = glob(filter_out=["B"], trim_after=["END"])
    assert clean_reply("xAyBz END more STOP", e, g) == "xyz"


def test_removal_repeats_until_no_phrase_remains():
    e = entity(filter_out=["ab"], trim_whitespace=False)
    assert clean_reply("aabbc", e, glob()) == "c"
    assert remove_phrases("xaabby", ["ab"]) == "xy"


def test_trim_after_uses_earliest_phrase_regardless_of_list_order():
    assert cut_at_earliest("one two three", ["three", "two"]) == "one "
    assert cut_at_earliest("abc", ["", "z"]) == "abc"


def test_skip_anywhere_means_no_reply():
    assert clean_reply("I have nothing [SKIP] to add", entity(), glob()) is None
    assert clean_reply("[skip] is not the marker", entity(), glob()) == "[skip] is not the marker"


def test_skip_checked_before_filtering():
    assert clean_reply("[SKIP]", entity(filter_out=["[SKIP]"]), glob()) is None


def test_empty_after_processing_is_none():
    assert clean_reply("Human: hi", entity(trim_after=["Human:"]), glob()) is None
    assert clean_reply("   \n ", entity(trim_whitespace=False), glob()) is None
    assert clean_reply("", entity(), glob()) is None
    assert clean_reply(None, entity(), glob()) is None


def test_whitespace_kept_when_trim_whitespace_is_off():
    assert clean_reply("  hi  ", entity(trim_whitespace=False), glob()) == "  hi  "


def test_length_cap_in_utf16_units_never_splits_emoji():
    assert clean_reply("x" * 1500, entity(), glob()) == "x" * 1000
    assert cap_utf16("ab😀c", 3) == "ab"          # the emoji needs 2 units
    assert cap_utf16("ab😀c", 4) == "ab😀"
    assert clean_reply("hello world", entity(), glob(), max_chars=6) == "hello"   # rstrip after cap
    with pytest.raises(ValueError, match="max_chars"):
        clean_reply("x", entity(), glob(), max_chars=0)


def test_works_with_real_config_models():
    models = pytest.importorskip("aibot.config")
    e = models.Entity.model_validate({"id": "a", "username": "Bot", "color": "255000000",
                                      "filterOut": ["Bot:"], "trimAfter": ["\\n"], "trimWhitespace": True})
    g = models.GlobalSettings.model_validate({"globalTrimAfter": ["Human:"]})
    assert clean_reply("Bot: hi Human: x", e, g) == "hi"


# ---------------------------------------------------------------- properties

alphabet = st.characters(codec="utf-8") | st.sampled_from(list("ab \n:[]SKIP"))
phrase = st.text(alphabet=st.sampled_from(list("ab \n:")), min_size=0, max_size=3)


@given(text=st.one_of(st.none(), st.text(alphabet=alphabet, max_size=200)),
       filters=st.lists(phrase, max_size=4), gfilters=st.lists(phrase, max_size=2),
       trims=st.lists(phrase, max_size=3), trim_ws=st.booleans(), cap=st.integers(1, 300))
def test_properties(text, filters, gfilters, trims, trim_ws, cap):
    e = entity(filter_out=filters, trim_after=trims, trim_whitespace=trim_ws)
    out = clean_reply(text, e, glob(filter_out=gfilters), max_chars=cap)
    if out is None:
        return
    assert out.strip()
    assert "[SKIP]" not in (text or "")
    for p in filters + gfilters:
        if p:
            assert p not in out, (p, out)
    for p in trims:
        if p:
            assert p not in out, (p, out)
    assert sum(2 if ord(c) > 0xFFFF else 1 for c in out) <= cap
    if trim_ws:
        assert out == out.strip()
    if not any(filters + gfilters):
        assert out in text   # without filters only cuts and strips happen


@given(st.text(max_size=300), st.lists(st.text(min_size=1, max_size=4), max_size=5))
def test_remove_phrases_fixpoint(text, phrases):
    out = remove_phrases(text, phrases)
    assert all(p not in out for p in phrases)
    assert len(out) <= len(text)
