"""Locates the `sql/` tree and parses named queries, so no SQL text lives in Python modules.

Query files follow procrastinate's format::

    -- query_name --
    -- one line saying why the query exists
    SELECT ... %(param)s ...;

In a source checkout (editable install) the tree is the repository's `sql/`; in a wheel it is
packaged as `aibot/sql/`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_PKG = Path(__file__).resolve().parent
_HEADER = re.compile(r"^-- ([a-z0-9_]+) --$", re.MULTILINE)


def sql_root() -> Path:
    for candidate in (_PKG / "sql", _PKG.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError("aibot's sql/ directory is missing from this installation")


def parse_query_file(text: str, origin: str = "<string>") -> dict[str, str]:
    queries: dict[str, str] = {}
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = body.strip("\n").splitlines()
        # The first comment line is the description; keep the SQL only.
        if lines and lines[0].startswith("--"):
            lines = lines[1:]
        sql = "\n".join(lines).strip()
        if not sql:
            raise ValueError(f"{origin}: query {name!r} is empty")
        if name in queries:
            raise ValueError(f"{origin}: query {name!r} is defined twice")
        queries[name] = sql
    return queries


@functools.cache
def queries() -> dict[str, str]:
    """Every named query from `sql/queries/*.sql`; names are unique across files."""
    found: dict[str, str] = {}
    for path in sorted((sql_root() / "queries").glob("*.sql")):
        for name, sql in parse_query_file(path.read_text(), str(path)).items():
            if name in found:
                raise ValueError(f"{path}: query {name!r} is already defined in another file")
            found[name] = sql
    return found


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no named query {name!r} in {sql_root() / 'queries'}") from None
