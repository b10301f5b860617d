"""Which model id to ask a server for, given an entity and the kind of server.

The original computed `quantizations[defaultQuantization].modelPath`, else `baseModel`, else `model`
(LM Studio ids are `<base>@<quant>`). When the team moved to Ollama and llama.cpp the same models
were renamed `<base>-<quant>`, so one entity config must name the model differently per backend.
Rule: a message's explicit `botParams.model` override wins verbatim; otherwise take the modelPath and,
if it is written in another backend's form (`<base>@<quant>` or `<base>-<quant>` for the default
quantization), rewrite it into this backend's template; with only `baseModel` + `defaultQuantization`,
build it from the template. Anything else is used as written (an operator's explicit path is trusted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aibot.config.issues import ConfigError, Issue

if TYPE_CHECKING:
    from aibot.config.models import Entity

SEPARATORS = ("@", "-")


class UnresolvableModel(ConfigError):
    """The entity names no model at all (no modelPath, baseModel or model)."""


def _template(kind: str) -> str:
    """The kind's `model_id_template`, declared by its backend class (`aibot.backends.registry`)."""
    from aibot.backends import registry

    return registry.model_id_template(kind)


def _split(path: str, quant: str, base_model: str | None) -> str | None:
    """The base name if `path` is `<base>@<quant>` or `<base>-<quant>`, else None."""
    for sep in SEPARATORS:
        suffix = f"{sep}{quant}"
        if path.lower().endswith(suffix.lower()) and len(path) > len(suffix):
            base = path[: -len(suffix)]
            if base_model is None or base == base_model or sep == "@":
                return base
    return None


def resolve_model_id(entity: Entity, backend_kind: str = "lmstudio", override: str | None = None) -> str:
    template = _template(backend_kind)
    if override is not None and override.strip():
        return override.strip()
    quant = entity.default_quantization
    if quant:
        q = entity.quantizations.get(quant)
        if q is not None and q.model_path:
            base = _split(q.model_path, quant, entity.base_model)
            return q.model_path if base is None else template.format(base=base, quant=quant)
        if entity.base_model:
            return template.format(base=entity.base_model, quant=quant)
    if entity.base_model:
        return entity.base_model
    if entity.model:
        return entity.model
    raise UnresolvableModel(
        [Issue(path=f"entity {entity.id!r}", value=None,
               message="no model: set quantizations[defaultQuantization].modelPath, "
                       "baseModel (+ defaultQuantization) or model")],
        source=f"(entity {entity.id!r})",
    )


def naming_kind(config) -> str:
    """The naming scheme jobs use for model ids: the servers' kind when they agree, else LM Studio's
    (the original's `<base>@<quant>`); each server then matches the name by its own identity rules."""
    kinds = {getattr(s, "kind", "lmstudio") for s in getattr(config, "servers", None) or []}
    return kinds.pop() if len(kinds) == 1 else "lmstudio"


def configured_model_ids(config) -> set[str]:
    """The model ids the enabled entities resolve to, named as jobs name them (`naming_kind`)."""
    kind = naming_kind(config)
    out = set()
    for entity in config.entities:
        if entity.enabled:
            try:
                out.add(resolve_model_id(entity, kind))
            except UnresolvableModel:
                continue
    return out


def model_problem(entity: Entity) -> str | None:
    """Why this entity's model cannot be resolved, or None if it can (used by the loader)."""
    quant = entity.default_quantization
    if quant and quant not in entity.quantizations and not entity.base_model:
        return (f"defaultQuantization {quant!r} is not a key of quantizations "
                f"({', '.join(entity.quantizations) or 'none'}) and there is no baseModel")
    try:
        resolve_model_id(entity)
    except UnresolvableModel as exc:
        return exc.issues[0].message
    return None
