"""What went wrong in a configuration, and where.

Every problem is an `Issue` naming the JSON path (`entities[3].rateLimits.maxPostsPerMinute`) and the
offending value, so an operator can fix the file without reading a traceback. Warnings use the same
shape as errors, so one report format serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (value: {short_repr(self.value)})"
        return f"{self.path or '<root>'}: {self.message}{shown}"


class ConfigError(Exception):
    """The configuration cannot be used. `.issues` lists every error found, not just the first;
    `.warnings` carries the warnings gathered before the errors stopped the load."""

    def __init__(self, issues: list[Issue], *, warnings: list[Issue] | None = None, source: str = ""):
        self.issues = list(issues)
        self.warnings = list(warnings or [])
        self.source = source
        head = f"invalid configuration {source}".rstrip() + f": {len(self.issues)} error(s)"
        lines = [head] + [f"  {issue}" for issue in self.issues[:20]]
        if len(self.issues) > 20:
            lines.append(f"  ... and {len(self.issues) - 20} more")
        super().__init__("\n".join(lines))


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def join_path(base: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{base}[{part}]"
    if not base:
        return part
    return f"{base}.{part}"
