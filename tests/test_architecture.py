"""The shape of the code, checked: no import cycles, the cluster package's one-way chain, named queries
run only by the package that owns them (and every one of them used), aibot's environment read only by
`aibot.settings`, and every module saying what it is for.

Read from the source with `ast`, so a violation names the file and line that introduced it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from aibot import cluster
import aibot
from aibot.db import queries as query_files

PACKAGE = Path(aibot.__file__).resolve().parent
EXEMPT = "aibot.sim"        # the simulator stands in for other people's servers; it is not aibot's code


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
                            if not _name(p).startswith(EXEMPT)}
TREES: dict[str, ast.Module] = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _resolve(name: str) -> str | None:
    """The aibot module an imported name lives in (`aibot.cluster.state.now` -> `aibot.cluster.state`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, *, module_level_only: bool = False) -> Iterator[tuple[str, int]]:
    """(imported aibot module, line) for every import statement of `module` (lazy ones too)."""
    tree = TREES[module]
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        else:
            continue
        for target in targets:
            found = _resolve(target) if target.startswith("aibot") else None
            if found and found != module and found != "aibot" and not found.startswith(EXEMPT):
                yield found, node.lineno


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level imports", "all imports"])
def test_no_import_cycles(module_level_only):
    graph = {m: {t for t, _ in imports(m, module_level_only=module_level_only)} for m in MODULES}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_cluster_chain_is_one_way():
    """A module of `aibot.cluster` imports only the cluster modules before it in `cluster.CHAIN`."""
    chain = [f"aibot.cluster.{m}" for m in cluster.CHAIN]
    assert sorted(chain) == sorted(m for m in MODULES if m.startswith("aibot.cluster.")), \
        "every cluster module has its place in aibot.cluster.CHAIN"
    for position, module in enumerate(chain):
        for target, line in imports(module):
            if target.startswith("aibot.cluster."):
                assert target in chain[:position], (
                    f"{MODULES[module]}:{line}: {module} imports {target}, which is not below it in the chain")


TOOLING = ("aibot.cli", "aibot.harness", "aibot.demo")     # commands and test/bench tooling, on top


def test_production_code_imports_no_tooling():
    """The packages that run a deployment never import the CLI, the harness or the demo (the config
    report, for one, is the CLI's: `aibot.cli.config_report`)."""
    for module in MODULES:
        if module.startswith(TOOLING) or module in ("aibot.__main__",):
            continue
        for target, line in imports(module):
            assert not target.startswith(TOOLING), f"{MODULES[module]}:{line}: {module} imports {target}"


def test_only_dramatiq_imports_the_actors():
    """`aibot.actors` builds the broker and declares the actor on import: nothing else may import it
    (doorbells name the actor; the runtime lives in `aibot.worker`)."""
    for module in MODULES:
        if module.startswith("aibot.actors"):
            continue
        for target, line in imports(module):
            assert not target.startswith("aibot.actors"), f"{MODULES[module]}:{line}: {module} imports {target}"


# --- named queries --------------------------------------------------------------------------------------

QUERIES = query_files.all_queries()        # name -> (owning package, sql)


def _string_literals(module: str) -> Iterator[tuple[str, int]]:
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value, node.lineno


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_executors_are_bound_to_their_own_module():
    """`db.Queries(__name__)`, never another package's name: the executor is the module's own."""
    seen = 0
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("db.Queries", "Queries"):
                assert [ast.unparse(a) for a in node.args] == ["__name__"], \
                    f"{MODULES[module]}:{node.lineno}: {ast.unparse(node)} must be bound to __name__"
                seen += 1
    assert seen >= 15


def test_every_named_query_is_run_only_by_its_owning_module():
    """A query's name appears only in the module its file is named after (`sql/queries/cluster/slots.sql`
    -> `aibot.cluster.slots`); other modules call that module's functions. The executor, bound to the
    package, makes running another package's query a KeyError; this catches the module level too."""
    for module in MODULES:
        for text, line in _string_literals(module):
            if text in QUERIES:
                owner = QUERIES[text]
                assert module == owner.module, (
                    f"{MODULES[module]}:{line}: {module} names query {text!r} of {owner.path.name}, "
                    f"which only {owner.module} runs")


def test_every_named_query_is_used():
    named = {text for module in MODULES for text, _ in _string_literals(module)}
    unused = sorted(set(QUERIES) - named)
    assert unused == [], f"queries nobody runs: {unused}"


def test_every_query_file_is_named_after_a_module_of_its_package():
    for query in QUERIES.values():
        assert query.module in MODULES, f"{query.path}: no module {query.module}"


def test_an_executor_cannot_run_another_packages_query(conn):
    from aibot import db

    with pytest.raises(KeyError, match="jobs_claim.*belongs to aibot.queue.jobs"):
        db.Queries("aibot.cluster.state").run(conn, "jobs_claim")


# --- settings -------------------------------------------------------------------------------------------

ENVIRONMENT_READERS = {"aibot.settings", "aibot.harness.stack"}   # the one reader, and the children's env


def test_only_settings_reads_aibots_environment():
    """Every AIBOT_* variable is read through `aibot.settings` (the harness only writes its children's)."""
    for module, tree in TREES.items():
        if module in ENVIRONMENT_READERS:
            continue
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("get", "pop", "setdefault", "getenv") and node.args:
                key = node.args[0]
            elif isinstance(node, ast.Subscript):
                key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("AIBOT_"):
                target = ast.unparse(node.func.value if isinstance(node, ast.Call) else node.value)
                if "environ" in target or target in ("os", "env"):
                    pytest.fail(f"{MODULES[module]}:{node.lineno}: reads {key.value} from {target}; "
                                "add it to aibot.settings.Settings instead")


# --- docstrings -----------------------------------------------------------------------------------------

def test_every_module_says_what_it_is_for():
    missing = [str(MODULES[m]) for m, tree in TREES.items()
               if not ast.get_docstring(tree) and MODULES[m].stat().st_size > 0]
    assert missing == []
