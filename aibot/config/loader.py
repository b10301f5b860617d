"""Reading a configuration from disk and turning every problem into a path-named `Issue`.

Two layouts are accepted: the original single `config-aientities.json`, and a directory holding one
`<entity-id>.json` per entity plus an optional `global.json` (the original's doc 192 layout, so an
entity can be edited, added or removed without touching the others). Both become the same raw dict
and go through the same validation, so they mean exactly the same thing.

Errors (the config cannot be used) and warnings (it can, but something looks off: unknown keys,
missing rate limits, converted colours) are collected in full rather than stopping at the first,
because an operator fixing a file wants the whole list at once.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ValidationError

from aibot.config import escapes
from aibot.config.color import is_rgb_form
from aibot.config.issues import ConfigError, Issue, join_path
from aibot.config.modelid import model_problem
from aibot.config.models import BotConfig, Entity, GlobalSettings

GLOBAL_FILE = "global.json"
MAX_USERNAME = 16  # the chat's limit in the original
_ENTITY_PATH = re.compile(r"^entities\[(\d+)\]")


@dataclass
class LoadResult:
    """Everything `aibot config check` shows; `config` is None when there are errors."""

    source: str
    form: Literal["file", "directory"]
    config: BotConfig | None = None
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    raw: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def load_config(path: str | os.PathLike[str]) -> BotConfig:
    """The validated configuration, or ConfigError listing every problem with its JSON path."""
    result = check_config(path)
    if result.errors:
        raise ConfigError(result.errors, warnings=result.warnings, source=result.source)
    assert result.config is not None
    return result.config


def check_config(path: str | os.PathLike[str]) -> LoadResult:
    p = Path(path)
    form: Literal["file", "directory"] = "directory" if p.is_dir() else "file"
    result = LoadResult(source=str(p), form=form)
    if form == "directory":
        raw, locate = _read_directory(p, result.errors)
    else:
        raw = _read_json_object(p, str(p), result.errors)
        locate = _identity
    if raw is None:
        return result
    result.raw = raw
    shape = _entity_shape(raw)
    if shape:  # nothing sensible to validate without an entity list
        result.errors[:] = [_relocate(i, locate, raw) for i in result.errors + shape]
        return result

    mode, mode_errors = _escape_mode(raw)
    context = {"escapes": mode}
    # The top level and each entity are validated separately, so one broken entity neither hides the
    # others' problems nor the warnings about everything that did parse.
    top: BotConfig | None = None
    try:
        top = BotConfig.model_validate({**raw, "entities": []}, context=context)
    except ValidationError as exc:
        result.errors.extend(_from_pydantic(e) for e in exc.errors())
        # Still warn about the sections that did parse.
        bad = {e["loc"][0] for e in exc.errors() if e["loc"]}
        rest = {k: v for k, v in raw.items() if k not in bad and k != "entities"}
        try:
            _unknown_keys(BotConfig.model_validate({**rest, "entities": []}, context=context), rest, "",
                          result.warnings)
        except ValidationError:
            pass
    result.errors.extend(mode_errors)
    if top is not None:
        _unknown_keys(top, raw, "", result.warnings)
    entities: list[Entity | None] = []
    for i, raw_entity in enumerate(raw["entities"]):
        base = f"entities[{i}]"
        try:
            entity = Entity.model_validate(raw_entity, context=context)
        except ValidationError as exc:
            result.errors.extend(_from_pydantic(e, base) for e in exc.errors())
            entities.append(None)
            continue
        entities.append(entity)
        _unknown_keys(entity, raw_entity, base, result.warnings)
        errors, warnings = _entity_checks(base, entity, raw_entity)
        result.errors.extend(errors)
        result.warnings.extend(warnings)
    if top is not None:
        errors, warnings = _global_checks(top, entities)
        result.errors.extend(errors)
        result.warnings.extend(warnings)
    if not result.errors and top is not None:
        config = top.model_copy(update={"entities": entities})
        config._warnings = list(result.warnings)
        config._source = str(p)
        result.config = config
    result.errors[:] = [_relocate(i, locate, raw) for i in result.errors]
    result.warnings[:] = [_relocate(i, locate, raw) for i in result.warnings]
    if result.config is not None:
        result.config._warnings = list(result.warnings)
    return result


# ---------------------------------------------------------------- reading


def _identity(path: str) -> str:
    return path


def _read_json_object(path: Path, label: str, errors: list[Issue]) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        errors.append(Issue(label, None, "file not found"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(Issue(label, None, f"cannot read file: {exc}"))
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        errors.append(Issue(label, None, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"))
        return None
    if not isinstance(data, dict):
        errors.append(Issue(label, _type_name(data), "must be a JSON object ({...})"))
        return None
    return data


def entity_files(directory: Path) -> list[Path]:
    """The entity files of a directory config, in a stable order (dotfiles are editor leftovers)."""
    return sorted(
        (f for f in directory.iterdir()
         if f.suffix == ".json" and f.name != GLOBAL_FILE and not f.name.startswith(".") and f.is_file()),
        key=lambda f: f.name,
    )


def _read_directory(directory: Path, errors: list[Issue]):
    """The raw dict of a directory config, and a function mapping its paths back to file:path."""
    glob_path = directory / GLOBAL_FILE
    raw: dict[str, Any] = {}
    moved: set[str] = set()
    if glob_path.exists():
        data = _read_json_object(glob_path, GLOBAL_FILE, errors)
        if data is not None:
            raw, moved = _split_global(data, errors)
    entities: list[Any] = []
    files: list[str] = []
    for f in entity_files(directory):
        data = _read_json_object(f, f.name, errors)
        if data is None:
            continue
        if "id" not in data:
            data = {"id": f.stem, **data}
        elif data["id"] != f.stem:
            errors.append(Issue(f"{f.name}:id", data["id"],
                                f"id must equal the file name {f.stem!r} (filename = entity id)"))
        entities.append(data)
        files.append(f.name)
    raw["entities"] = entities

    def locate(path: str) -> str:
        m = _ENTITY_PATH.match(path)
        if m and int(m.group(1)) < len(files):
            rest = path[m.end():].lstrip(".")
            return f"{files[int(m.group(1))]}:{rest}" if rest else files[int(m.group(1))]
        if path == "entities":
            return f"{directory.name}/ (entity files)"
        if path.startswith("globalSettings."):
            key = path.split(".", 2)[1].split("[", 1)[0]
            if key in moved:
                return f"{GLOBAL_FILE}:{path[len('globalSettings.'):]}"
        if path.startswith(f"{GLOBAL_FILE}") or ".json" in path.split(":", 1)[0]:
            return path
        return f"{GLOBAL_FILE}:{path}" if path else GLOBAL_FILE

    return raw, locate


def _split_global(data: dict[str, Any], errors: list[Issue]) -> tuple[dict[str, Any], set[str]]:
    """`global.json` may hold top-level keys (botSettings, lmStudioServers, ...) or, as in doc 192,
    the globalSettings keys directly; the latter are moved under `globalSettings`."""
    top_keys = _input_names(BotConfig)
    gs_keys = _input_names(GlobalSettings)
    raw: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in data.items():
        if key == "entities":
            errors.append(Issue(f"{GLOBAL_FILE}:entities", None,
                                "a directory config keeps each entity in its own <id>.json, not in global.json"))
        elif key in top_keys or key.startswith("_"):
            raw[key] = value
        elif key in gs_keys:
            moved[key] = value
        else:
            raw[key] = value  # unknown: reported as a warning with its path
    if moved:
        gs = raw.get("globalSettings")
        if gs is None:
            raw["globalSettings"] = moved
        elif isinstance(gs, dict):
            raw["globalSettings"] = {**moved, **gs}
    return raw, set(moved)


def _input_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.update(_choices(info.validation_alias) or [name])
    return names


def _choices(alias: Any) -> list[str]:
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str)]
    if isinstance(alias, str):
        return [alias]
    return []


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# ---------------------------------------------------------------- validation helpers


def _entity_shape(raw: dict[str, Any]) -> list[Issue]:
    """`entities` must exist and be a list: the original crashed later if not; fail here instead."""
    if "entities" not in raw:
        return [Issue("entities", None, "missing: the config must list its entities (an array)")]
    if not isinstance(raw["entities"], list):
        return [Issue("entities", _type_name(raw["entities"]), "must be an array of entity objects")]
    return []


def _escape_mode(raw: dict[str, Any]) -> tuple[str, list[Issue]]:
    top = raw.get("escapes")
    gs = raw.get("globalSettings")
    nested = gs.get("escapes") if isinstance(gs, dict) else None
    valid = [m for m in (top, nested) if m in escapes.MODES]
    if top in escapes.MODES and nested in escapes.MODES and top != nested:
        return top, [Issue("globalSettings.escapes", nested,
                           f"contradicts top-level escapes {top!r}; set it in one place")]
    return (valid[0] if valid else escapes.DEFAULT_MODE), []


def _loc_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path = join_path(path, part)
    return path


def _from_pydantic(err: dict[str, Any], base: str = "") -> Issue:
    loc = (base,) + tuple(err.get("loc", ())) if base else tuple(err.get("loc", ()))
    missing = err.get("type") == "missing"
    message = str(err.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if missing:
        message = "missing (required)"
    elif err.get("type", "").endswith("_type"):
        message = f"{message}, got {_type_name(err.get('input'))}"
    return Issue(_loc_path(loc), None if missing else err.get("input"), message)


def _relocate(issue: Issue, locate, raw: dict[str, Any]) -> Issue:
    """Names the entity in entity issues and maps paths to files for a directory config."""
    message = issue.message
    m = _ENTITY_PATH.match(issue.path)
    if m:
        entities = raw.get("entities")
        i = int(m.group(1))
        if isinstance(entities, list) and i < len(entities) and isinstance(entities[i], dict):
            eid = entities[i].get("id")
            if isinstance(eid, str) and f"entity {eid!r}" not in message:
                message = f"entity {eid!r}: {message}"
    return Issue(locate(issue.path), issue.value, message)


def _unknown_keys(model: BaseModel, raw: dict[str, Any], path: str, out: list[Issue]) -> None:
    """Warns about keys no model declares (typos, newer keys); `_`-prefixed keys are notes, and a
    second spelling of one setting (`maxTokens` and `max_tokens`) is reported as ignored."""
    fields = type(model).model_fields
    alias_of = {alias: name for name, info in fields.items() for alias in _choices(info.validation_alias)}
    extra = model.__pydantic_extra__ or {}
    for key in list(extra):
        if key.startswith("_"):
            continue
        if key in alias_of:
            used = next(a for a in _choices(fields[alias_of[key]].validation_alias) if a in raw)
            out.append(Issue(join_path(path, key), extra[key],
                             f"another name for {used!r}, which is also set and wins; this one is ignored"))
            del extra[key]
        else:
            out.append(Issue(join_path(path, key), extra[key], "unknown key (kept, ignored)"))
    for name, info in fields.items():
        key = next((a for a in _choices(info.validation_alias) if a in raw), None)
        if key is None:
            continue
        value, raw_value, sub = getattr(model, name), raw[key], join_path(path, key)
        if isinstance(value, BaseModel) and isinstance(raw_value, dict):
            _unknown_keys(value, raw_value, sub, out)
        elif isinstance(value, list) and isinstance(raw_value, list):
            for i, (v, rv) in enumerate(zip(value, raw_value)):
                if isinstance(v, BaseModel) and isinstance(rv, dict):
                    _unknown_keys(v, rv, join_path(sub, i), out)
        elif isinstance(value, dict) and isinstance(raw_value, dict):
            for k, v in value.items():
                if isinstance(v, BaseModel) and isinstance(raw_value.get(k), dict):
                    _unknown_keys(v, raw_value[k], join_path(sub, k), out)


def _entity_checks(base: str, entity: Entity, raw_entity: dict[str, Any]) -> tuple[list[Issue], list[Issue]]:
    errors: list[Issue] = []
    warnings: list[Issue] = []
    problem = model_problem(entity)
    if problem:
        # A disabled entity is never queued, so its missing model cannot hurt yet.
        (errors if entity.enabled else warnings).append(Issue(base, None, problem))
    if entity.rate_limits is None:
        warnings.append(Issue(f"{base}.rateLimits", None,
                              "missing: this entity is not rate-limited (the original crashed here)"))
    if is_rgb_form(raw_entity.get("color")):
        warnings.append(Issue(f"{base}.color", raw_entity.get("color"),
                              f"old rgb(r,g,b) form converted to {entity.color}"))
    if len(entity.username) > MAX_USERNAME:
        warnings.append(Issue(f"{base}.username", entity.username,
                              f"longer than the chat's {MAX_USERNAME} characters"))
    return errors, warnings


def _global_checks(config: BotConfig, entities: list[Entity | None]) -> tuple[list[Issue], list[Issue]]:
    errors: list[Issue] = []
    warnings: list[Issue] = []
    if not entities:
        warnings.append(Issue("entities", None, "no entities: the bot will answer nothing"))
    seen: dict[str, int] = {}
    for i, entity in enumerate(entities):
        if entity is None:
            continue
        if entity.id in seen:
            errors.append(Issue(f"entities[{i}].id", entity.id, f"duplicate id (also entities[{seen[entity.id]}])"))
        seen.setdefault(entity.id, i)

    names: dict[str, str] = {}
    for key, servers in (("lmStudioServers", config.lm_studio_servers), ("servers", config.extra_servers)):
        for i, server in enumerate(servers):
            where = f"{key}[{i}]"
            assert server.name is not None
            if server.name in names:
                errors.append(Issue(f"{where}.name", server.name, f"duplicate server name (also {names[server.name]})"))
            names.setdefault(server.name, where)
    if not config.servers:
        warnings.append(Issue("lmStudioServers", None, "no servers configured"))
    elif not any(s.enabled for s in config.servers):
        warnings.append(Issue("lmStudioServers", None, "every server is disabled"))
    if not config.queue_settings.enabled:
        warnings.append(Issue("queueSettings.enabled", False,
                              "ignored: aibot always uses its queue (the original's direct mode only logged an error)"))
    return errors, warnings
