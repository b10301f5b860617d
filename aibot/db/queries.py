"""Locates the `sql/` tree and parses the named queries in it, so no SQL text lives in Python modules.

Query files follow procrastinate's format::

    -- query_name --
    -- one line saying why the query exists
    SELECT ... %(param)s ...;

Queries are owned per package: `sql/queries/<package>/<module>.sql` holds what the module
`aibot.<package>.<module>` runs (`<package>/<package>.sql` for the package's own `__init__`), and only
`aibot.db.Queries` bound to that package can run them. Names stay unique across all packages, so a
name found in a log or in psql points at one file.

In a source checkout (editable install) the tree is the repository's `sql/`; in a wheel it is
packaged as `aibot/sql/`. This module owns the file format and the lookup; it runs nothing.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import NamedTuple

_PKG = Path(__file__).resolve().parent.parent   # the aibot package
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


def owner_of(module: str) -> str:
    """The package that owns the queries a module may run: `aibot.cluster.state` -> `cluster`."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "aibot" or not parts[1]:
        raise ValueError(f"named queries belong to a package of aibot; {module!r} is not a module of one")
    return parts[1]


def query_files(package: str) -> list[Path]:
    return sorted((sql_root() / "queries" / package).glob("*.sql"))


@functools.cache
def package_queries(package: str) -> dict[str, str]:
    """Every named query of one package, from `sql/queries/<package>/*.sql`."""
    found: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for path in query_files(package):
        for name, sql in parse_query_file(path.read_text(), str(path)).items():
            if name in found:
                raise ValueError(f"{path}: query {name!r} is already defined in {origin[name]}")
            found[name], origin[name] = sql, path
    return found


def packages() -> list[str]:
    """The packages that own named queries (the folders of `sql/queries/`)."""
    return sorted(p.name for p in (sql_root() / "queries").iterdir() if p.is_dir())


class NamedQuery(NamedTuple):
    package: str      # the package whose executor runs it
    module: str       # the module its file is named after, the one that runs it
    path: Path
    sql: str


@functools.cache
def all_queries() -> dict[str, NamedQuery]:
    """Every named query of every package; a name defined by two packages is an error."""
    found: dict[str, NamedQuery] = {}
    for package in packages():
        mine = package_queries(package)
        for path in query_files(package):
            module = f"aibot.{package}" if path.stem == package else f"aibot.{package}.{path.stem}"
            for name in parse_query_file(path.read_text(), str(path)):
                if name in found:
                    raise ValueError(f"query {name!r} is defined by both {found[name].path} and {path}")
                found[name] = NamedQuery(package, module, path, mine[name])
    return found
