"""Which chat messages become jobs, and with what: pure functions, no I/O.

The bot reads whatever a chat service, a table or a pipe hands it, so every field is untrusted. One
function, `evaluate`, turns one raw message into exactly one `Decision` and never raises: the loop
must survive any input, and an operator must be able to see *why* a message was not answered, so
malformed input becomes a `reject` decision with a reason naming the field and (truncated) value.

Rules (the original bot's final behaviour, see docs/bot.md):
- not a JSON object                         -> reject
- `message-type` == "AI" (any case)         -> ignore (bots never answer bots: no loops)
- no `botParams` / no `botParams.entity`    -> ignore (a message between humans)
- `botParams.processed` is true             -> ignore (already answered by the old bot)
- unknown or disabled entity                -> reject
- bad text/username/context/ais/model/ts    -> reject
- otherwise                                 -> job, with priority, model, capped context, identity
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

MAX_TEXT_CHARS = 10_000
MAX_USERNAME_CHARS = 64
MAX_ID_CHARS = 200
MAX_MODEL_CHARS = 200
MAX_CONTEXT_LINE_CHARS = 10_000
MAX_AIS_NAME_CHARS = 16
DEFAULT_PRIORITY = 50
DEFAULT_NOM = 100
DEFAULT_SENDER = "anon"
VALUE_PREVIEW_CHARS = 60

# RRRGGGBBB, each channel 000-255, optionally followed by -suffix (the frontend's later colour form).
_COLOR = re.compile(r"^(\d{3})(\d{3})(\d{3})(-[A-Za-z0-9]{1,32})?$")

JOB, REJECT, IGNORE = "job", "reject", "ignore"


@dataclass(frozen=True)
class Decision:
    """What to do with one message. `entity_id` is "-" when no entity could be read."""

    action: str                      # job | reject | ignore
    message_id: str
    entity_id: str = "-"
    priority: int = DEFAULT_PRIORITY
    model: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    message_at: datetime | None = None
    warnings: tuple[str, ...] = ()


class _Reject(Exception):
    """Internal: carries a reject reason out of the nested checks."""


def preview(value: Any, limit: int = VALUE_PREVIEW_CHARS) -> str:
    """A short, single-line rendering of an offending value for reasons and logs."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    text = storable(text.replace("\n", "\\n"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def storable(text: str) -> str:
    """`text` with what Postgres refuses (NUL, lone surrogates) made visible as escapes."""
    if is_storable(text):
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def is_storable(text: str) -> bool:
    """Postgres text/jsonb hold neither NUL nor lone surrogates; one such message must not be able to
    fail the insert of its whole batch (and so stall the source forever)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def synthetic_id(raw: Any) -> str:
    """A stable id for a message that has none, so re-reading it dedupes instead of piling up rejects."""
    try:
        canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        canonical = repr(raw)
    return "raw-" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_color(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not _COLOR.match(value):
        raise _Reject(f"{field_name}: expected RRRGGGBBB (9 digits, optional -suffix), got {preview(value)}")
    m = _COLOR.match(value)
    assert m is not None
    for channel in m.groups()[:3]:
        if int(channel) > 255:
            raise _Reject(f"{field_name}: colour channel {channel} is above 255 in {preview(value)}")
    return value


def random_color(seed: str) -> str:
    """A colour derived from `seed`: 'random' for the user, but the same on every retry and re-read."""
    digest = hashlib.sha256(seed.encode("utf-8", "surrogatepass")).digest()
    return "".join(f"{b:03d}" for b in digest[:3])


def parse_ais(value: Any, seed: str) -> tuple[str, str] | None:
    """`Name:RRRGGGBBB` or `Name:random` -> (name, colour); None/"" -> no override."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Reject(f"botParams.ais: expected 'Name:color' or 'Name:random', got {preview(value)}")
    name, sep, color = value.rpartition(":")
    if not sep:
        raise _Reject(f"botParams.ais: expected 'Name:color' or 'Name:random', got {preview(value)}")
    name = name.strip()
    if not name:
        raise _Reject(f"botParams.ais: the name is empty in {preview(value)}")
    if len(name) > MAX_AIS_NAME_CHARS:
        raise _Reject(f"botParams.ais: name longer than {MAX_AIS_NAME_CHARS} characters: {preview(name)}")
    if not is_storable(name):
        raise _Reject(f"botParams.ais: the name contains a NUL character or invalid Unicode: {preview(name)}")
    color = color.strip()
    if color.lower() == "random":
        return name, random_color(seed)
    return name, parse_color(color, "botParams.ais colour")


def parse_priority(value: Any) -> int | None:
    """An integer 0..99 (0 is valid and highest), else None. Integral floats and digit strings count
    because URL parameters arrive as text."""
    if _is_int(value):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d{1,3}\s*", value):
        number = int(value)
    else:
        return None
    return number if 0 <= number <= 99 else None


def choose_priority(message_priority: Any, entity_default: Any, queue_default: Any) -> tuple[int, str | None]:
    """The priority chain: message, else entity `defaultPriority`, else `queueSettings.defaultPriority`,
    else 50. An unusable message priority falls through (the URL contract ignores out-of-range values)
    and produces a warning; it does not reject the message."""
    warning = None
    if message_priority is not None:
        parsed = parse_priority(message_priority)
        if parsed is not None:
            return parsed, None
        warning = f"botParams.priority ignored (not an integer 0..99): {preview(message_priority)}"
    for fallback in (entity_default, queue_default):
        parsed = parse_priority(fallback) if fallback is not None else None
        if parsed is not None:
            return parsed, warning
    return DEFAULT_PRIORITY, warning


def cap_context(lines: list[str], nom: Any) -> list[str]:
    """The last `nom` lines ("send what you see", capped by the entity)."""
    limit = nom if _is_int(nom) and nom >= 0 else DEFAULT_NOM
    return list(lines[-limit:]) if limit else []


def _message_id(raw: dict, fallback_id: str | None) -> str:
    if "id" not in raw or raw["id"] is None or raw["id"] == "":
        return fallback_id or synthetic_id(raw)
    value = raw["id"]
    if _is_int(value):
        return str(value)
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS and value.strip() == value and is_storable(value):
        return value
    raise _Reject(f"id: expected a string of at most {MAX_ID_CHARS} characters or an integer, got {preview(value)}")


def _timestamp(raw: dict) -> tuple[int | None, datetime | None]:
    value = raw.get("timestamp")
    if value is None:
        return None, None
    if isinstance(value, str) and re.fullmatch(r"\d{1,16}", value):
        value = int(value)
    if (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and 0 <= value < 1e16:
        ms = int(value)
        try:
            return ms, datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            pass
    raise _Reject(f"timestamp: expected milliseconds since the epoch, got {preview(value)}")


def _string(raw: dict, key: str, *, max_chars: int, label: str | None = None, required: bool = True,
            default: str | None = None) -> str | None:
    label = label or key
    value = raw.get(key)
    if value is None:
        if required:
            raise _Reject(f"{label}: missing")
        return default
    if not isinstance(value, str):
        raise _Reject(f"{label}: expected a string, got {preview(value)}")
    if len(value) > max_chars:
        raise _Reject(f"{label}: longer than {max_chars} characters ({len(value)}): {preview(value)}")
    if not is_storable(value):
        raise _Reject(f"{label}: contains a NUL character or invalid Unicode: {preview(value)}")
    return value


def _context(raw: dict) -> list[str]:
    value = raw.get("context")
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Reject(f"context: expected a list of strings, got {preview(value)}")
    for i, line in enumerate(value):
        if not isinstance(line, str):
            raise _Reject(f"context[{i}]: expected a string, got {preview(line)}")
        if len(line) > MAX_CONTEXT_LINE_CHARS:
            raise _Reject(f"context[{i}]: longer than {MAX_CONTEXT_LINE_CHARS} characters ({len(line)})")
        if not is_storable(line):
            raise _Reject(f"context[{i}]: contains a NUL character or invalid Unicode: {preview(line)}")
    return value


def evaluate(raw: Any, config: Any, *, backend_kind: str = "lmstudio", fallback_id: str | None = None,
             resolve_model: Callable[..., str] | None = None) -> Decision:
    """Decides what one raw message becomes. Never raises (any surprise becomes a reject).

    `config` is a `BotConfig` (only `entity(id)` and `queue_settings.default_priority` are used);
    `resolve_model` defaults to `aibot.config.resolve_model_id`; `fallback_id` names a message that
    carries no id of its own (e.g. the inbox row), before falling back to a hash of its JSON.
    """
    try:
        return _evaluate(raw, config, backend_kind, fallback_id, resolve_model)
    except Exception as exc:  # the promise is "never raises": a bug here must not stop the loop
        mid = fallback_id or synthetic_id(raw)
        if isinstance(raw, dict) and (_is_int(raw.get("id")) or isinstance(raw.get("id"), str)) and raw.get("id"):
            mid = storable(str(raw["id"]))[:MAX_ID_CHARS]
        return Decision(REJECT, mid, reason=f"internal error evaluating message: {type(exc).__name__}: {exc}")


def _evaluate(raw: Any, config: Any, backend_kind: str, fallback_id: str | None,
              resolve_model: Callable[..., str] | None) -> Decision:
    if not isinstance(raw, dict):
        return Decision(REJECT, fallback_id or synthetic_id(raw),
                        reason=f"message: expected a JSON object, got {type(raw).__name__} {preview(raw)}")
    try:
        message_id = _message_id(raw, fallback_id)
    except _Reject as exc:
        return Decision(REJECT, synthetic_id(raw), reason=str(exc))

    kind = raw.get("message-type")
    if kind is not None and not isinstance(kind, str):
        return Decision(REJECT, message_id, reason=f"message-type: expected a string, got {preview(kind)}")
    if isinstance(kind, str) and kind.strip().lower() == "ai":
        return Decision(IGNORE, message_id, reason="AI message (bots never answer bots)")

    params = raw.get("botParams")
    if params is None:
        return Decision(IGNORE, message_id, reason="no botParams (a message between humans)")
    if not isinstance(params, dict):
        return Decision(REJECT, message_id, reason=f"botParams: expected an object, got {preview(params)}")
    if params.get("processed") is True:
        return Decision(IGNORE, message_id, reason="botParams.processed is true (already answered)")
    entity_id = params.get("entity")
    if entity_id is None or entity_id == "":
        return Decision(IGNORE, message_id, reason="no botParams.entity (nobody asked to answer)")
    if not isinstance(entity_id, str) or len(entity_id) > MAX_ID_CHARS or not is_storable(entity_id):
        return Decision(REJECT, message_id,
                        reason=f"botParams.entity: expected an entity id string, got {preview(entity_id)}")

    entity = config.entity(entity_id)
    queue_default = getattr(getattr(config, "queue_settings", None), "default_priority", None)
    entity_default = getattr(entity, "default_priority", None) if entity is not None else None
    priority, warning = choose_priority(params.get("priority"), entity_default, queue_default)
    base = dict(message_id=message_id, entity_id=entity_id, priority=priority)
    if entity is None:
        return Decision(REJECT, **base, reason=f"botParams.entity: unknown entity {preview(entity_id)}")
    if not getattr(entity, "enabled", True):
        return Decision(REJECT, **base, reason=f"botParams.entity: entity {preview(entity_id)} is disabled")

    try:
        text = _string(raw, "text", max_chars=MAX_TEXT_CHARS)
        assert text is not None
        if not text.strip():
            raise _Reject("text: empty")
        sender = _string(raw, "username", max_chars=MAX_USERNAME_CHARS, required=False, default=DEFAULT_SENDER)
        sender_color = _string(raw, "color", max_chars=64, required=False)
        domain = _string(raw, "domain", max_chars=200, required=False)
        ts_ms, message_at = _timestamp(raw)
        context = cap_context(_context(raw), getattr(entity, "nom", DEFAULT_NOM))
        ais = parse_ais(params.get("ais"), seed=f"{message_id}|{entity_id}")
        override = _string(params, "model", max_chars=MAX_MODEL_CHARS, label="botParams.model", required=False)
        override = override.strip() if override else None
    except _Reject as exc:
        return Decision(REJECT, **base, reason=str(exc))

    if resolve_model is None:
        from aibot.config import resolve_model_id as resolve_model
    try:
        model = resolve_model(entity, backend_kind, override or None)
    except Exception as exc:
        return Decision(REJECT, **base, reason=f"model: cannot resolve for entity {preview(entity_id)}: {exc}")

    warnings = (warning,) if warning else ()
    payload = {
        "message_id": message_id,
        "entity_id": entity_id,
        "text": text,
        "username": sender,                  # who wrote the message
        "user_color": sender_color,
        "context": context,
        "ais": {"name": ais[0], "color": ais[1]} if ais else None,   # reply identity override
        "entity_username": getattr(entity, "username", None),
        "entity_color": getattr(entity, "color", None),
        "model_override": override or None,
        "message_ts": ts_ms,
        "domain": domain,
        "warnings": list(warnings),
    }
    return Decision(JOB, model=model, payload=payload, message_at=message_at, warnings=warnings, **base)
