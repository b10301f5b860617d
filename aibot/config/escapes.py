"""What a backslash sequence in a prompt, `trimAfter`, `filterOut` or stop sequence means.

The original bot's config wrote `"\\\\n"` in JSON (the two characters backslash and n) where its
authors meant a newline: prompts reached the model with a literal `\\n`, the `"\\\\n"` trimAfter entry
only matched that literal, and the global stop sequences never stopped anything (original doc 188).

Decision: in those text fields aibot turns the two-character sequences `\\n`, `\\t` and `\\\\` into a
newline, a tab and one backslash ("unescape", the default), so existing configs do what their
authors intended. Any other backslash sequence is left alone. A config that really wants the literal
characters sets `"escapes": "literal"` at the top level (or in `globalSettings`), which disables the
translation everywhere. The mode is decided once per file, never per field, so a reader of the config
knows what every string means.
"""

from __future__ import annotations

import re
from typing import Literal

EscapeMode = Literal["unescape", "literal"]
MODES: tuple[str, ...] = ("unescape", "literal")
DEFAULT_MODE: EscapeMode = "unescape"

_SEQUENCE = re.compile(r"\\([nt\\])")
_REPLACEMENT = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n` → newline, `\\t` → tab, `\\\\` → backslash, in one left-to-right pass (so `\\\\n` is a
    backslash followed by the letter n, the way to write a literal backslash-n in unescape mode)."""
    return _SEQUENCE.sub(lambda m: _REPLACEMENT[m.group(1)], text)


def apply(text: str, mode: str = DEFAULT_MODE) -> str:
    return text if mode == "literal" else unescape(text)


def apply_all(texts: list[str], mode: str = DEFAULT_MODE) -> list[str]:
    return [apply(t, mode) for t in texts]
