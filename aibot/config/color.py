"""The chat's colour format: nine digits RRRGGGBBB (each 000-255), optionally `-<suffix>`.

The suffix arrived with original doc 212 (colour uniqueness); early configs used CSS `rgb(r,g,b)`,
which the original converted by hand on 09-29. aibot converts that form too (with a warning from the
loader) so an old file still loads, and rejects anything else with the value in the message.
"""

from __future__ import annotations

import re

_NINE = re.compile(r"^(\d{3})(\d{3})(\d{3})(-[A-Za-z0-9]+)?$")
_RGB = re.compile(r"^rgb\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)$", re.IGNORECASE)

FORMAT_HELP = "9 digits RRRGGGBBB, each 000-255, optionally followed by -SUFFIX (e.g. 080175220 or 080175220-a1)"


def parse_color(value: str) -> str:
    """The canonical colour string, or ValueError naming the value and the expected format."""
    text = value.strip()
    rgb = _RGB.match(text)
    if rgb:
        parts = [int(p) for p in rgb.groups()]
        if any(p > 255 for p in parts):
            raise ValueError(f"colour {value!r}: components must be 0-255")
        return "".join(f"{p:03d}" for p in parts)
    nine = _NINE.match(text)
    if not nine:
        raise ValueError(f"colour {value!r} is not {FORMAT_HELP}")
    for name, part in zip(("red", "green", "blue"), nine.groups()[:3]):
        if int(part) > 255:
            raise ValueError(f"colour {value!r}: {name} component {part} is above 255")
    return text


def is_rgb_form(value: object) -> bool:
    return isinstance(value, str) and bool(_RGB.match(value.strip()))
