"""Turns an entity, the triggering message and its chat context into a chat-completion request.

Pure: no I/O (the token counter is passed in). Two formats, chosen per entity by `prompt_mode`:

`messages` (default; the original's final, DO-era format, original-bot.md §4.8):
  1. the prompt, `system_prompt + user_prompt` (concatenated exactly as the original did), as one
     message with role `system_role` (left out if both are empty);
  2. each context line `"name: text"` as its own turn: lines by the entity (its `username` or the
     `ais` posting name, exact match) become `assistant` turns with the `name: ` prefix stripped, so
     the model sees its own words; every other line becomes a `user` turn and keeps its `name: `
     prefix, so a multi-user chat stays readable; a line without `": "` is a user turn as is;
  3. the current message as a `user` turn, `"sender: text"` (just `text` when there is no sender).
  Consecutive turns with the same role are merged (joined with a newline). This replaces the
  original's trailing empty assistant message, which existed only because llama.cpp returned 500 when
  two assistant turns ended the list; strict chat templates (Gemma's) also demand alternating roles.
  `empty_assistant_turn=True` brings the old trailing `{"role": "assistant", "content": ""}` back.

`legacy` (the original at HEAD, §4.6/§5.9): a single message with role `system_role` and content
  `system_prompt + user_prompt + "\\n\\nContext: " + context`, where context is the lines plus
  `"sender: text"` joined by newlines, then `"\\n"` if `add_newline_to_context`, then
  `"<username>: "` if `add_entity_username`.

Context: if the last context line repeats the current message (the frontend sometimes includes it;
the original's duplicate-message bug, §5.9), it is dropped; then only the newest `nom` lines are kept;
then the oldest lines are dropped until the prompt fits `token_budget` (default: the entity's
`context_token_budget`). The prompt and the current message are never dropped, even if they alone
exceed the budget. Cost of a message = tokens of its content + `tokens.MESSAGE_OVERHEAD`; tokens come
from `count_tokens` (e.g. a backend's `tokenize`) or the chars/4 estimate (`aibot.generation.tokens`).

Stop sequences: `global_stop_sequences` then the entity's `stop_sequences`, duplicates removed (both
already unescaped by `aibot.config`). Sampler params: only those the entity sets.

Pure: no I/O; the token counter is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aibot.backends.base import ChatRequest
from aibot.generation.tokens import MESSAGE_OVERHEAD, FallbackCounter, TokenCounter, estimate_tokens, make_counter

#: Tokens a chat template adds outside every message (BOS, the generation prompt): kept free on top
#: of each message's MESSAGE_OVERHEAD when a prompt is fitted to an instance's context.
TEMPLATE_MARGIN = 16
#: Reply tokens reserved when the entity sets no max_tokens (servers then generate until a stop).
DEFAULT_REPLY_RESERVE = 256


class PromptTooLong(ValueError):
    """The prompt cannot fit the serving instance's context even with no history: the job's own,
    deterministic fault (retrying elsewhere with the same context fails the same way)."""


def context_budget(context_length: int | None, max_tokens: int | None, entity_budget: int | None) -> int | None:
    """Prompt tokens one request may use on an instance with `context_length` tokens per request: the
    context minus the reply (`max_tokens`) minus the template's margin, and never above the entity's
    own `context_token_budget`. None when neither limit is known."""
    if context_length is None:
        return entity_budget
    reply = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else DEFAULT_REPLY_RESERVE
    room = context_length - reply - TEMPLATE_MARGIN
    if room < 1:
        raise PromptTooLong(f"the instance's context is {context_length} tokens per request, which leaves no room "
                            f"for a prompt next to max_tokens {reply}; lower maxTokens or give the model more "
                            "context (llama.cpp: -c / --parallel; LM Studio: context_length)")
    return room if entity_budget is None else min(room, entity_budget)


def prompt_tokens(request: ChatRequest, count: Callable[[str], int]) -> int:
    """What the request's messages cost against a context budget (contents plus per-message overhead)."""
    return sum(count(m["content"]) + MESSAGE_OVERHEAD for m in request.messages)


def fit(build: Callable[[TokenCounter | None], ChatRequest], budget: int,
        server_count: TokenCounter | None) -> tuple[ChatRequest, int]:
    """The request `build(count_tokens)` trims to `budget`, and what it costs (the caller rejects it when
    that is over the budget). The chars/4 estimate decides first; when the prompt comes near the budget
    the server's tokenizer (`server_count`, where the backend has one) decides instead, trimming and
    checking with the same counts. If the server's tokenizer failed or had no answer on any call, its
    trim mixed the two counters and is dropped: the estimate's trim and check stand."""
    request = build(None)
    if server_count is not None and prompt_tokens(request, estimate_tokens) > budget // 2:
        counter = FallbackCounter(server_count)
        fitted = build(counter)
        need = prompt_tokens(fitted, counter)
        if not counter.degraded:
            return fitted, need
    return request, prompt_tokens(request, estimate_tokens)


SAMPLER_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "repeat_penalty", "min_p",
                  "frequency_penalty", "presence_penalty")
ROLES = ("system", "user", "assistant")


def sampler_params(entity: Any) -> dict[str, Any]:
    return {name: value for name in SAMPLER_FIELDS if (value := getattr(entity, name, None)) is not None}


def stop_sequences(entity: Any, global_settings: Any) -> list[str]:
    merged = [*(getattr(global_settings, "global_stop_sequences", None) or []),
              *(getattr(entity, "stop_sequences", None) or [])]
    return list(dict.fromkeys(s for s in merged if s))


def split_line(line: str) -> tuple[str | None, str]:
    """`"name: text"` → (`name`, `text`); a line without `": "` → (None, line)."""
    name, sep, rest = line.partition(": ")
    return (name, rest) if sep else (None, line)


def speaker_line(sender: str | None, text: str) -> str:
    return f"{sender}: {text}" if sender else text


def history_turns(lines: Iterable[str], assistant_names: set[str]) -> list[dict[str, str]]:
    turns = []
    for line in lines:
        name, rest = split_line(line)
        if name is not None and name in assistant_names:
            turns.append({"role": "assistant", "content": rest})
        else:
            turns.append({"role": "user", "content": line})
    return turns


def merge_turns(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Joins consecutive same-role messages with a newline (strict templates need alternation)."""
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def keep_newest(costs: Sequence[int], room: int) -> int:
    """How many of the newest items (costs oldest → newest) fit in `room`; never negative."""
    kept, used = 0, 0
    for cost in reversed(costs):
        if used + cost > room:
            break
        used += cost
        kept += 1
    return kept


def clean_context(context_lines: Sequence[Any] | None, current: str, nom: int | None) -> list[str]:
    """Validated, de-duplicated, `nom`-capped context lines (oldest first)."""
    lines: list[str] = []
    for i, line in enumerate(context_lines or []):
        if not isinstance(line, str):
            raise ValueError(f"context_lines[{i}] must be a string like 'name: text', got {type(line).__name__}")
        if line.strip():
            lines.append(line)
    if lines and lines[-1].strip() == current.strip():
        lines.pop()
    if nom is not None:
        lines = lines[-nom:] if nom > 0 else []
    return lines


def build_request(entity: Any, *, text: str, sender: str | None, context_lines: Sequence[str] | None, model: str,
                  global_settings: Any, token_budget: int | None = None, count_tokens: TokenCounter | None = None,
                  ai_name: str | None = None, empty_assistant_turn: bool = False,
                  stream: bool = False) -> ChatRequest:
    """The request for one generation. `model` is already resolved (override applied by the caller);
    `ai_name` is the `ais` posting name, whose context lines count as the entity's own."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty model id, got {model!r}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    role = getattr(entity, "system_role", None) or "system"
    if role not in ROLES:
        raise ValueError(f"entity {getattr(entity, 'id', '?')!r}: system_role must be one of {ROLES}, got {role!r}")
    budget = token_budget if token_budget is not None else getattr(entity, "context_token_budget", None)
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"token_budget must be a positive integer, got {budget!r}")

    count = make_counter(count_tokens)
    current = speaker_line(sender, text)
    lines = clean_context(context_lines, current, getattr(entity, "nom", None))
    prompt = (getattr(entity, "system_prompt", None) or "") + (getattr(entity, "user_prompt", None) or "")
    if getattr(entity, "prompt_mode", "messages") == "legacy":
        messages = _legacy_messages(entity, role, prompt, lines, current, budget, count)
    else:
        assistant_names = {n for n in (getattr(entity, "username", None), ai_name) if n}
        messages = _turn_messages(role, prompt, lines, current, assistant_names, budget, count)
        if empty_assistant_turn:
            messages.append({"role": "assistant", "content": ""})
    return ChatRequest(model=model, messages=messages, params=sampler_params(entity),
                       stop=stop_sequences(entity, global_settings), stream=stream)


def _turn_messages(role: str, prompt: str, lines: list[str], current: str, assistant_names: set[str],
                   budget: int | None, count: Callable[[str], int]) -> list[dict[str, str]]:
    head = [{"role": role, "content": prompt}] if prompt else []
    tail = [{"role": "user", "content": current}]
    turns = history_turns(lines, assistant_names)
    if budget is not None:
        fixed = sum(count(m["content"]) + MESSAGE_OVERHEAD for m in head + tail)
        costs = _lazy_costs(turns, budget - fixed, count)
        turns = turns[len(turns) - keep_newest(costs, budget - fixed):] if costs is not None else turns
    return merge_turns(head + turns + tail)


def _lazy_costs(turns: list[dict[str, str]], room: int, count: Callable[[str], int]) -> list[int] | None:
    """Costs of the newest turns, counted newest-first and only until `room` is used up, so a server
    tokenizer is asked about the turns that could fit, not all 200. Older turns get a cost that cannot
    fit. Returns None if there are no turns."""
    if not turns:
        return None
    costs = [room + 1] * len(turns)
    used = 0
    for i in range(len(turns) - 1, -1, -1):
        costs[i] = count(turns[i]["content"]) + MESSAGE_OVERHEAD
        used += costs[i]
        if used > room:
            break
    return costs


def _legacy_messages(entity: Any, role: str, prompt: str, lines: list[str], current: str, budget: int | None,
                     count: Callable[[str], int]) -> list[dict[str, str]]:
    suffix = ("\n" if getattr(entity, "add_newline_to_context", False) else "") + (
        f"{entity.username}: " if getattr(entity, "add_entity_username", False) else "")

    def content(kept: list[str]) -> str:
        return prompt + "\n\nContext: " + "\n".join([*kept, current]) + suffix

    if budget is not None:
        # Each dropped line also drops its "\n" joiner; count each line with it.
        fixed = count(content([])) + MESSAGE_OVERHEAD
        costs = [count(line + "\n") for line in lines]
        lines = lines[len(lines) - keep_newest(costs, budget - fixed):]
    return [{"role": role, "content": content(lines)}]
