"""The server kinds aibot can talk to, derived from the backend classes themselves.

Every class in a module of `aibot.backends` that declares a `kind` of its own is a kind: the modules
are found with pkgutil and imported on first use, so adding a kind is adding its module. A class
declares, next to its code, everything the rest of aibot needs to know about the kind:

    kind               the name operators write in the config (`"kind": "ollama"`)
    can_load           whether aibot can load and unload models there (placement skips it if not)
    model_id_template  how a configured base model and quantization become a model id there
    default_port       the port it listens on when the config gives only an `ip` (None: say `port`)
    catalogue()        how it lists what it offers and which instances are loaded (base.Backend)

Config validation and its message (`aibot.config.models`), model-id templates
(`aibot.config.modelid`), placement's `can_load` (`aibot.cluster.state`) and `make_backend` all ask
this registry; nothing else lists the kinds, not even the database. `register` adds a kind that lives
outside the package (a plugin, a test). This module owns the list; it builds no backend itself.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from pathlib import Path

# This package, found from this file: importing `aibot.backends` here would make a cycle with its
# `__init__`, which imports the factory, which imports this registry.
_PACKAGE = __name__.rpartition(".")[0]
_PACKAGE_DIR = Path(__file__).resolve().parent

_lock = threading.RLock()
_kinds: dict[str, type] = {}
_discovered = False


def _declares_kind(obj: object) -> bool:
    return isinstance(obj, type) and isinstance(vars(obj).get("kind"), str) and callable(getattr(obj, "catalogue", None))


def _discover() -> None:
    global _discovered
    with _lock:
        if _discovered:
            return
        found: dict[str, type] = {}
        for info in sorted(pkgutil.iter_modules([str(_PACKAGE_DIR)]), key=lambda i: i.name):
            module = importlib.import_module(f"{_PACKAGE}.{info.name}")
            for obj in vars(module).values():
                if _declares_kind(obj) and obj.__module__ == module.__name__:
                    _add(found, obj)
        # Kinds registered before discovery (a plugin imported early) stay, after the built-in ones.
        for kind, cls in _kinds.items():
            _add(found, cls)
        _kinds.clear()
        _kinds.update(found)
        _discovered = True


def _add(into: dict[str, type], cls: type) -> None:
    kind = vars(cls)["kind"]
    if into.get(kind, cls) is not cls:
        raise ValueError(f"backend kind {kind!r} is declared by both {into[kind].__qualname__} and {cls.__qualname__}")
    into[kind] = cls


def register(cls: type) -> type:
    """Adds a backend class declared outside `aibot.backends` (usable as a class decorator)."""
    if not _declares_kind(cls):
        raise TypeError(f"{cls!r} is not a backend class: it needs its own `kind` and a `catalogue` method")
    with _lock:
        _add(_kinds, cls)
    return cls


def unregister(kind: str) -> None:
    """Forgets a kind added with `register` (tests clean up after themselves)."""
    _discover()
    with _lock:
        _kinds.pop(kind, None)


def kinds() -> tuple[str, ...]:
    """Every known kind, in the order error messages list them."""
    _discover()
    with _lock:
        return tuple(_kinds)


def get(kind: str) -> type:
    """The backend class of `kind`; ValueError naming the known kinds otherwise."""
    _discover()
    with _lock:
        cls = _kinds.get(kind)
    if cls is None:
        raise ValueError(f"unknown server kind {kind!r}; expected one of {', '.join(kinds())}")
    return cls


def can_load(kind: str) -> bool:
    """Whether aibot can load and unload models on this kind of server."""
    return bool(get(kind).can_load)


def model_id_template(kind: str) -> str:
    return get(kind).model_id_template


def default_port(kind: str) -> int | None:
    return get(kind).default_port
