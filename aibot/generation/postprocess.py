"""Turns a model's raw reply into the text to post, or None when nothing should be posted.

Order (the original's `postComment`, original-bot.md §5.10, plus two fixes):
  1. `[SKIP]` anywhere in the raw reply → None (§5.8; case-sensitive, checked before any filtering
     so a filter phrase cannot hide it).
  2. Remove every `filter_out` + `global_filter_out` phrase (case-sensitive), repeated until none is
     left: removing "ab" from "aabb" leaves "ab", which a single pass would post.
  3. Cut at the earliest occurrence of any `trim_after` + `global_trim_after` phrase.
  4. Strip surrounding whitespace if `trim_whitespace`.
  5. Cap the length at `max_chars` (the chat API takes 1000), counted in UTF-16 code units because
     that is what the JavaScript side measures; an astral character (emoji) is never split.
  6. Empty or whitespace-only → None (the original posted empty replies; we don't).
Steps 3–5 only ever take a prefix or strip, so they cannot re-create a removed phrase.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SKIP_MARKER = "[SKIP]"
DEFAULT_MAX_CHARS = 1000


def remove_phrases(text: str, phrases: Iterable[str]) -> str:
    """Removes every occurrence of every phrase until none remains (empty phrases are ignored)."""
    phrases = [p for p in dict.fromkeys(phrases) if p]
    while True:
        before = text
        for phrase in phrases:
            text = text.replace(phrase, "")
        if text == before:
            return text


def cut_at_earliest(text: str, phrases: Iterable[str]) -> str:
    """The text before the earliest occurrence of any phrase (unchanged if none occurs)."""
    positions = [i for p in phrases if p and (i := text.find(p)) >= 0]
    return text[: min(positions)] if positions else text


def cap_utf16(text: str, max_units: int) -> str:
    """The longest prefix whose UTF-16 length is at most `max_units`."""
    if len(text) * 2 <= max_units:
        return text
    units = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > max_units:
            return text[:i]
    return text


def clean_reply(text: str | None, entity: Any, global_settings: Any, *,
                max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """The reply to post, or None (`[SKIP]`, or nothing left after filtering)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars!r}")
    if not text or SKIP_MARKER in text:
        return None
    text = remove_phrases(text, [*(getattr(entity, "filter_out", None) or []),
                                 *(getattr(global_settings, "global_filter_out", None) or [])])
    text = cut_at_earliest(text, [*(getattr(entity, "trim_after", None) or []),
                                  *(getattr(global_settings, "global_trim_after", None) or [])])
    if getattr(entity, "trim_whitespace", False):
        text = text.strip()
    text = cap_utf16(text, max_chars)
    if getattr(entity, "trim_whitespace", False):
        text = text.rstrip()
    return text if text.strip() else None
