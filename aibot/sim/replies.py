"""Deterministic reply text and token counts, so tests can assert on what came back and from which model.

A "token" here is a word or a punctuation mark (`TOKEN_RE`); counts in `usage` always match the text sent.
Prompt triggers let a test ask for post-processing cases without configuring the server:
`[sim:skip]` in the prompt gives the reply "[SKIP]", `[sim:human]` appends a "\nHuman: ..." tail.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
FILLER = ("the", "quiet", "river", "remembers", "every", "stone", "it", "has", "passed", ",", "and", "so",
          "do", "I", ";", "tell", "me", "more", "about", "what", "you", "see", ".")
HUMAN_TAIL = ["\n", "Human", ":", " What", " do", " you", " think", "?"]


def count_tokens(text: str) -> int:
    return len(TOKEN_RE.findall(text))


def token_ids(text: str) -> list[int]:
    """Stable fake vocabulary ids (crc32 of the token), as /tokenize would return."""
    return [zlib.crc32(t.encode()) % 32000 for t in TOKEN_RE.findall(text)]


def content_text(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; only the text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def prompt_text(messages: Iterable[Mapping[str, Any]]) -> str:
    return "\n".join(content_text(m.get("content")) for m in messages)


def prompt_tokens(messages: list[Mapping[str, Any]]) -> int:
    """Like chat templates: the content plus a few tokens of role framing per message."""
    return sum(count_tokens(content_text(m.get("content"))) + 4 for m in messages)


def _phrase(messages: list[Mapping[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"] or messages
    text = content_text(users[-1].get("content")) if users else ""
    words = TOKEN_RE.findall(text.replace("[sim:skip]", "").replace("[sim:human]", ""))
    return " ".join(w for w in words[:6] if w.isalnum()) or "nothing"


def _as_pieces(text: str) -> list[str]:
    """Splits text into token pieces, each carrying its leading space, so ''.join(pieces) == text."""
    return [m.group(0) for m in re.finditer(r"\s*(?:\w+|[^\w\s])", text)]


@dataclass(frozen=True)
class ReplyPlan:
    pieces: list[str]
    finish_reason: str          # "stop" | "length"

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def plan_reply(model: str, messages: list[Mapping[str, Any]], counter: int, *, reply_tokens: int,
               max_tokens: int | None = None, stop: list[str] | None = None, skip: bool = False,
               human_tail: bool = False) -> ReplyPlan:
    """The reply names the model, a per-server counter and the first words of the prompt, then filler."""
    text = prompt_text(messages)
    skip = skip or "[sim:skip]" in text
    human_tail = human_tail or "[sim:human]" in text
    if skip:
        pieces = _as_pieces("[SKIP]")
    else:
        short = model.split("/")[-1]
        pieces = _as_pieces(f"{short} reply {counter}: {_phrase(messages)}.")
        i = 0
        while len(pieces) < reply_tokens:
            word = FILLER[i % len(FILLER)]
            pieces.append(word if word in ",.;" else " " + word)
            i += 1
        pieces = pieces[:max(reply_tokens, 1)]
        if human_tail:
            pieces += HUMAN_TAIL
    finish = "stop"
    for s in stop or []:
        if not s:
            continue
        joined = "".join(pieces)
        at = joined.find(s)
        if at >= 0:
            pieces = _cut(pieces, at)
    if max_tokens is not None and max_tokens < len(pieces):
        pieces = pieces[:max(max_tokens, 0)]
        finish = "length"
    return ReplyPlan(pieces, finish)


def _cut(pieces: list[str], at: int) -> list[str]:
    out, pos = [], 0
    for p in pieces:
        if pos + len(p) <= at:
            out.append(p)
            pos += len(p)
        else:
            if at > pos:
                out.append(p[: at - pos])
            break
    return out
