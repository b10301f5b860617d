"""Request building (aibot.generation.prompt) and the token estimate (aibot.generation.tokens): pure, no I/O."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aibot.generation.prompt import build_request, fit, merge_turns, prompt_tokens, split_line
from aibot.generation.tokens import MESSAGE_OVERHEAD, estimate_tokens, make_counter


def entity(**over):
    """An entity with the attribute names of aibot.config.Entity (docs/internals.md)."""
    base = dict(
        id="poet", username="Poet", system_role="system", system_prompt="You are Poet. ",
        user_prompt="Reply briefly.", nom=100, prompt_mode="messages", context_token_budget=None,
        add_newline_to_context=False, add_entity_username=False, stop_sequences=[],
        temperature=None, max_tokens=None, top_p=None, top_k=None, repeat_penalty=None, min_p=None,
        frequency_penalty=None, presence_penalty=None,
    )
    base.update(over)
    return SimpleNamespace(**base)


GLOBAL = SimpleNamespace(global_stop_sequences=["\n\n"], global_filter_out=[], global_trim_after=[])


def build(e=None, **kw):
    args = dict(text="hello there", sender="alice", context_lines=[], model="m@q8_0", global_settings=GLOBAL)
    args.update(kw)
    return build_request(e or entity(), **args)


# ---------------------------------------------------------------- tokens

@pytest.mark.parametrize("text,expected", [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)])
def test_estimate_is_chars_over_four_rounded_up(text, expected):
    assert estimate_tokens(text) == expected


def test_counter_uses_server_count_and_falls_back_on_failure():
    assert make_counter(lambda s: 7)("abc") == 7
    assert make_counter(lambda s: None)("abcdefgh") == 2     # tokenizer has no answer -> estimate
    asked = []
    no_answer = make_counter(lambda s: asked.append(s))
    assert no_answer("abcd") == 1 and no_answer("abcdefgh") == 2
    assert asked == ["abcd"]       # its counts would be thrown away (prompt.fit): not asked again
    calls = []

    def broken(s):
        calls.append(s)
        raise RuntimeError("tokenizer down")

    count = make_counter(broken)
    assert count("abcdefgh") == 2 and count("abcd") == 1
    assert calls == ["abcdefgh"]   # not asked again after the first failure


LINE = "The harbour master counted the ships again and wrote every name in the big ledger. " * 6   # 513 chars


def _fit_build(count_tokens):
    return build(context_lines=[f"sailor{i}: {LINE}" for i in range(20)], token_budget=1000,
                 count_tokens=count_tokens)


def server_tokens(text: str) -> int:
    """A tokenizer that counts English lower than chars/4, as Gemma's does (101 tokens for one of LINE's
    lines against the estimate's 127; measured on the real router, tests/real_llm)."""
    return -(-len(text) // 5)


def test_fit_near_the_budget_trims_by_the_servers_counts():
    by_estimate, need_estimate = fit(_fit_build, 1000, None)
    fitted, need = fit(_fit_build, 1000, server_tokens)
    assert need <= 1000 and need == prompt_tokens(fitted, server_tokens)
    assert len(fitted.messages[-1]["content"]) > len(by_estimate.messages[-1]["content"])   # more history fits
    assert need_estimate <= 1000


def test_fit_falls_back_to_the_estimate_alone_when_the_tokenizer_fails_part_way():
    """CI (real router): the tokenizer failed after the trim; the check then counted the trimmed prompt
    by the estimate, over the budget, and a prompt that fits was rejected. A trim and its check must use
    the same counter."""
    for fail_after in range(0, 14):
        calls = []

        def flaky(text):
            calls.append(text)
            if len(calls) > fail_after:
                raise ConnectionError("tokenizer went away")
            return server_tokens(text)

        fitted, need = fit(_fit_build, 1000, flaky)
        assert need <= 1000, (fail_after, need)
        assert need == prompt_tokens(fitted, estimate_tokens) or need == prompt_tokens(fitted, server_tokens)


def test_fit_when_the_tokenizer_has_no_answer_for_some_texts():
    answers = iter([None, 80, None] + [101] * 40)
    fitted, need = fit(_fit_build, 1000, lambda text: next(answers))
    assert need == prompt_tokens(fitted, estimate_tokens) <= 1000       # a mixed trim is dropped


# ---------------------------------------------------------------- messages mode

def test_full_request_shape():
    e = entity(temperature=0.7, max_tokens=100, top_p=0.8, top_k=40, repeat_penalty=1.15, min_p=0.05,
               stop_sequences=["Human:", "\n\n"])
    req = build(e, context_lines=["bob: hi all", "Poet: Greetings.", "alice: how are you?"])
    assert req.model == "m@q8_0"
    assert req.messages == [
        {"role": "system", "content": "You are Poet. Reply briefly."},
        {"role": "user", "content": "bob: hi all"},
        {"role": "assistant", "content": "Greetings."},
        {"role": "user", "content": "alice: how are you?\nalice: hello there"},
    ]
    assert req.params == {"temperature": 0.7, "max_tokens": 100, "top_p": 0.8, "top_k": 40,
                          "repeat_penalty": 1.15, "min_p": 0.05}
    assert req.stop == ["\n\n", "Human:"]          # global first, duplicates removed
    assert req.stream is False


def test_only_set_sampler_params_are_sent():
    req = build(entity(temperature=0.0, presence_penalty=0.3))
    assert req.params == {"temperature": 0.0, "presence_penalty": 0.3}


def test_ais_name_lines_are_assistant_turns_and_prefix_is_stripped():
    req = build(context_lines=["Muse: I am the muse", "carol: who?"], ai_name="Muse")
    assert req.messages[1] == {"role": "assistant", "content": "I am the muse"}
    assert req.messages[2]["role"] == "user"


def test_name_match_is_exact():
    req = build(context_lines=["poet: lowercase impostor", "Poet2: other bot"])
    assert [m["role"] for m in req.messages] == ["system", "user"]
    assert req.messages[1]["content"].startswith("poet: lowercase impostor\nPoet2: other bot")


def test_consecutive_assistant_turns_merge_and_no_trailing_empty_assistant():
    req = build(context_lines=["Poet: one", "Poet: two"])
    assert req.messages[1:] == [{"role": "assistant", "content": "one\ntwo"},
                                {"role": "user", "content": "alice: hello there"}]
    roles = [m["role"] for m in req.messages]
    assert all(a != b for a, b in zip(roles, roles[1:]))


def test_empty_assistant_turn_is_an_option():
    req = build(empty_assistant_turn=True)
    assert req.messages[-1] == {"role": "assistant", "content": ""}


def test_system_role_user_merges_prompt_with_first_user_turn():
    req = build(entity(system_role="user"), context_lines=["bob: hi"])
    assert req.messages == [{"role": "user", "content": "You are Poet. Reply briefly.\nbob: hi\nalice: hello there"}]


def test_bad_system_role_and_model_named_in_error():
    with pytest.raises(ValueError, match="system_role"):
        build(entity(system_role="narrator"))
    with pytest.raises(ValueError, match="model"):
        build(model="")
    with pytest.raises(ValueError, match=r"context_lines\[1\]"):
        build(context_lines=["a: b", 42])


def test_line_without_separator_is_a_user_turn_and_blank_lines_are_skipped():
    assert split_line("no separator here") == (None, "no separator here")
    assert split_line("a:b: c") == ("a:b", "c")
    req = build(context_lines=["just text", "   ", ""])
    assert req.messages[1] == {"role": "user", "content": "just text\nalice: hello there"}


def test_current_message_repeated_at_end_of_context_is_dropped():
    req = build(context_lines=["bob: yo", "alice: hello there"])
    assert req.messages[-1]["content"] == "bob: yo\nalice: hello there"


def test_no_sender_sends_bare_text_and_empty_prompt_is_omitted():
    req = build(entity(system_prompt="", user_prompt=""), sender=None)
    assert req.messages == [{"role": "user", "content": "hello there"}]


def test_context_capped_to_nom_newest_lines():
    lines = [f"u{i}: m{i}" for i in range(10)]
    req = build(entity(nom=3), context_lines=lines)
    assert req.messages[1]["content"] == "u7: m7\nu8: m8\nu9: m9\nalice: hello there"
    req0 = build(entity(nom=0), context_lines=lines)
    assert req0.messages[1:] == [{"role": "user", "content": "alice: hello there"}]


def test_token_budget_drops_oldest_turns_first_never_system_or_current():
    # Alternate roles so merging does not hide which turns survived.
    lines = [("Poet" if i % 2 else "bob") + f": {'x' * 40}{i}" for i in range(20)]
    e = entity(system_prompt="S" * 400, user_prompt="")   # 100 tokens
    # system 100+4, current "alice: hi" 3+4; turns cost 15 (Poet, prefix stripped) or 16 (bob): room for 3.
    budget = 100 + MESSAGE_OVERHEAD + 3 + MESSAGE_OVERHEAD + 15 + 16 + 15 + 5
    req = build(e, context_lines=lines, token_budget=budget, text="hi")
    assert req.messages[0]["content"] == "S" * 400
    history = req.messages[1:-1]
    assert [m["content"][-2:] for m in history] == ["17", "18", "19"]
    assert [m["role"] for m in history] == ["assistant", "user", "assistant"]
    assert req.messages[-1] == {"role": "user", "content": "alice: hi"}
    total = sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD for m in req.messages)
    assert total <= budget


def test_budget_smaller_than_fixed_parts_keeps_system_and_current_only():
    req = build(context_lines=["bob: a", "Poet: b"], token_budget=1)
    assert [m["role"] for m in req.messages] == ["system", "user"]
    assert req.messages[-1]["content"] == "alice: hello there"


def test_entity_budget_is_default_and_server_counter_is_used():
    seen = []

    def counter(text):
        seen.append(text)
        return 1000 if "huge" in text else 1

    req = build(entity(context_token_budget=50), context_lines=["bob: huge line", "carol: small"],
                count_tokens=counter)
    assert "bob: huge line" not in req.messages[1]["content"]
    assert "carol: small" in req.messages[1]["content"]
    assert "carol: small" in seen


def test_only_turns_that_could_fit_are_counted():
    seen = []

    def counter(text):
        seen.append(text)
        return 10

    build(context_lines=[f"u{i}: t" for i in range(200)], token_budget=60, count_tokens=counter)
    assert len(seen) < 10     # system + current + a few newest, not all 200 lines


# ---------------------------------------------------------------- legacy mode

def test_legacy_single_message_like_the_original_head():
    e = entity(prompt_mode="legacy", system_role="assistant", add_newline_to_context=True,
               add_entity_username=True)
    req = build(e, context_lines=["bob: hi", "Poet: hello"])
    assert req.messages == [{
        "role": "assistant",
        "content": "You are Poet. Reply briefly.\n\nContext: bob: hi\nPoet: hello\nalice: hello there\nPoet: ",
    }]


def test_legacy_flags_off_and_budget_trims_oldest_lines():
    e = entity(prompt_mode="legacy", system_prompt="P", user_prompt="")
    lines = [f"u{i}: {'y' * 36}" for i in range(10)]      # 40 chars + newline -> 11 tokens each
    fixed = estimate_tokens("P\n\nContext: alice: hello there") + MESSAGE_OVERHEAD
    req = build(e, context_lines=lines, token_budget=fixed + 2 * 11)
    assert req.messages[0]["content"] == "P\n\nContext: " + "\n".join(lines[-2:]) + "\nalice: hello there"


def test_with_real_config_entity():
    models = pytest.importorskip("aibot.config")
    e = models.Entity.model_validate({"id": "a", "username": "Bot", "color": "255000000", "systemPrompt": "S.",
                                      "temperature": 0.5, "stopSequences": ["END"]})
    g = models.GlobalSettings.model_validate({"globalStopSequences": ["\\n"]})
    req = build_request(e, text="hey", sender="al", context_lines=["Bot: yo"], model="x", global_settings=g)
    assert req.messages[0] == {"role": "system", "content": "S.Generate a response based on the conversation context."}
    assert req.messages[1] == {"role": "assistant", "content": "yo"}
    assert req.stop == ["\n", "END"] and req.params == {"temperature": 0.5}


# ---------------------------------------------------------------- properties

names = st.sampled_from(["Poet", "bob", "alice", "Muse", ""])
lines_st = st.lists(st.builds(lambda n, t: f"{n}: {t}" if n else t, names, st.text(max_size=30)), max_size=30)


@given(lines=lines_st, budget=st.one_of(st.none(), st.integers(1, 400)), text=st.text(max_size=40))
def test_properties_of_any_context(lines, budget, text):
    req = build(context_lines=lines, token_budget=budget, text=text, ai_name="Muse")
    roles = [m["role"] for m in req.messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert all(a != b for a, b in zip(roles, roles[1:]))           # merged: roles alternate
    assert req.messages[-1]["content"].endswith(f"alice: {text}")  # current message always last
    assert all(isinstance(m["content"], str) for m in req.messages)


def test_merge_turns_keeps_input_untouched():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert merge_turns(msgs) == [{"role": "user", "content": "a\nb"}]
    assert msgs[0] == {"role": "user", "content": "a"}


# --- fitting a prompt to the serving instance's context ------------------------------------------------

def test_context_budget_leaves_room_for_the_reply_and_the_template():
    from aibot.generation.prompt import DEFAULT_REPLY_RESERVE, TEMPLATE_MARGIN, context_budget

    assert context_budget(1024, 100, None) == 1024 - 100 - TEMPLATE_MARGIN      # llama.cpp: per slot
    assert context_budget(1024, None, None) == 1024 - DEFAULT_REPLY_RESERVE - TEMPLATE_MARGIN
    assert context_budget(4096, 100, 500) == 500                                 # the entity's own cap wins
    assert context_budget(None, 100, 500) == 500 and context_budget(None, 100, None) is None


def test_a_context_too_small_for_the_reply_is_a_clear_error():
    from aibot.generation.prompt import PromptTooLong, context_budget

    with pytest.raises(PromptTooLong, match="context is 100 tokens per request.*max_tokens 100"):
        context_budget(100, 100, None)


def test_history_is_trimmed_to_the_budget_and_the_result_fits():
    from aibot.generation.prompt import prompt_tokens

    lines = [f"user{i}: " + "word " * 40 for i in range(60)]          # ~50 tokens each, ~3000 in all
    req = build(context_lines=lines, token_budget=600)
    assert prompt_tokens(req, estimate_tokens) <= 600
    text = "\n".join(m["content"] for m in req.messages)
    assert text.endswith("alice: hello there")                         # the current message stays
    assert "user59:" in text and "user0:" not in text                  # the newest history stays
