"""LM Studio (`kind = "lmstudio"`): native REST for residency, OpenAI paths for chat.

Facts and sources: /work/shared/reference/lmstudio-0.4-rest.md ("docs:" = a path in `lmstudio-ai/docs`,
rendered at lmstudio.ai/docs). API levels, newest first:
- `v1` (0.4.0+): `GET /api/v1/models` lists every downloaded model once, by `key`, with its `variants`,
  `selected_variant`, `size_bytes`, `max_context_length` and `loaded_instances[]` (each with its own `id`
  and `config.parallel` / `config.context_length`); `POST /api/v1/models/load|unload` (docs:1_developer/2_rest/).
- `v0` (0.3.6+): `GET /api/v0/models` with `state`; no parallel, no size. Loads are JIT: a one-token chat.
- `openai`: only `/v1/models`, which may list every downloaded model when JIT is on
  (docs:1_developer/3_openai-compat/models.md); every listed model counts as loaded. Loads are JIT.

Identity on a v1 server: a configured `key@variant` denotes the entry only when it is that entry's
`selected_variant`, because the REST load takes keys only and loads the selected variant
(lmstudio-bug-tracker #1462; lmstudio-ai/lms #588). Instances are named after the key, not the variant:
`the-eternal`, then `the-eternal:2` for a second instance (#168, #1582), so aibot loads by key, adopts a
loaded instance instead of loading again, and unloads by instance id.

The working level is found on first use and remembered per instance, because probing three paths
on every refresh would triple the traffic. A server fault never downgrades the level (a 500 says
nothing about the API version); only 404/405 or an answer without the expected list does, which
covers LM Studio's habit of answering unknown paths with 200 `{"error": "Unexpected endpoint..."}`
(lmstudio-bug-tracker #618, #1323).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from aibot.backends.base import (
    BackendError,
    BadResponse,
    Catalogue,
    InsufficientResources,
    LoadedModel,
    LoadFailed,
    ModelUnavailable,
    Offered,
    RequestFault,
    ServerInfo,
    find,
)
from aibot.backends.http import Unsupported, error_text, mentions_resources, truncate
from aibot.backends.openai_compat import (
    CHAT_PATH,
    OpenAICompatBackend,
    embedded_error,
    identify_by_names,
    match_one,
    models_data,
    without_publisher,
)

log = logging.getLogger("aibot.backends.lmstudio")

LEVELS = ("v1", "v0", "openai")
_PATHS = {"v1": "/api/v1/models", "v0": "/api/v0/models", "openai": "/v1/models"}
LOAD_PATH = "/api/v1/models/load"
UNLOAD_PATH = "/api/v1/models/unload"

#: JIT-loaded models are unloaded after 60 minutes idle by default; Auto-Evict (default on) keeps "at most 1
#: model ... loaded in memory at a time (when loaded via JIT)" (docs:1_developer/0_core/ttl-and-auto-evict.md).
#: On v0 and OpenAI-only servers every load aibot makes is a JIT load, so both apply to what it loads there.
JIT_IDLE_TTL_SECONDS = 60 * 60
JIT_MAX_LOADED = 1

_INSTANCE_SUFFIX = re.compile(r"(?P<key>.+):(?P<n>[0-9]+)")   # `key:2`, `key:3`, ... (#168, #1582)
_ERROR_TYPE = re.compile(r'"type"\s*:\s*"(?P<type>[a-z_]+)"')


class _LevelMissing(Exception):
    """This API level is not served here (404/405 or an unexpected answer)."""


@dataclass(frozen=True)
class LMStudioModel(Offered):
    """One `GET /api/v1/models` entry. `variants` are all its variant names (the selected one included).

    `refusal` is set only on the stand-in `identify` returns for a variant that is NOT the selected one:
    such a name is findable (so the loader reports why it cannot be served, permanently, instead of "no
    such model") but not loadable, because LM Studio's REST load takes keys only and loads the selected
    variant (#1462): `load` raises ModelUnavailable with this text.
    """

    variants: tuple[str, ...] = ()
    selected_variant: str | None = None
    refusal: str | None = None


def same_variant(a: str, b: str) -> bool:
    """Equal, ignoring case after the `@`: LM Studio writes variant suffixes in lower case while showing
    the quantization in upper case (`quantization.name` "Q4_K_M" beside variant `...@q4_k_m` in the
    documented list example, docs:1_developer/2_rest/list.md), so a config written from the UI's `@Q4_K_M`
    means the same variant. The key part stays exact: keys are identifiers."""
    if a == b:
        return True
    base_a, at_a, quant_a = a.rpartition("@")
    base_b, at_b, quant_b = b.rpartition("@")
    return bool(at_a and at_b) and base_a == base_b and quant_a.casefold() == quant_b.casefold()


_announced: dict[str, str] = {}   # server URL -> the API level last logged for it


class LMStudioBackend(OpenAICompatBackend):
    kind = "lmstudio"
    can_load = True
    # Not asked: LM Studio documents no `stream_options` among its chat payload params (docs:1_developer/
    # 3_openai-compat/chat-completions.md) and refuses unrecognized fields elsewhere (lmstudio-bug-tracker
    # #2024), so a refused chat is not risked for a measurement; its replies are counted as chars / 4.
    stream_usage = False
    model_id_template = "{base}@{quant}"   # LM Studio's variant names: `key@quant` (#1462)
    default_port = 1234                    # docs:1_developer/0_core/0_server/settings.md "Server Port"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.api_level: str | None = None

    # -- API level --------------------------------------------------------------------------------

    def _fetch(self, level: str, profile: str = "control") -> list[dict[str, Any]]:
        path = _PATHS[level]
        where = f"GET {self.http.display}{path}"
        try:
            body = self.http.request("GET", path, profile=profile)
        except RequestFault as exc:
            if exc.status in (404, 405):
                raise _LevelMissing(str(exc)) from None
            raise
        if level == "v1":
            if isinstance(body, dict) and isinstance(body.get("models"), list):
                return [m for m in body["models"] if isinstance(m, dict)]
        elif isinstance(body, dict) and isinstance(body.get("data"), list):
            return models_data(body, where)
        if isinstance(body, dict) and "error" in body:
            raise _LevelMissing(f"{where}: {body.get('error')!r}")
        raise BadResponse(f"{where}: unexpected models answer (no {'models' if level == 'v1' else 'data'} list)")

    def _models(self, profile: str = "control") -> tuple[str, list[dict[str, Any]]]:
        """(level, raw model list) from the remembered level, detecting it on first use."""
        with self._lock:
            known = self.api_level
        if known is not None:
            return known, self._fetch(known, profile)
        for level in LEVELS:
            try:
                models = self._fetch(level, profile)
            except _LevelMissing as exc:
                log.debug("LM Studio %s API not available at %s: %s", level, self.http.display, exc)
                continue
            with self._lock:
                self.api_level = level
            # A refresh builds a new backend every tick: say it once per server and level, not per tick.
            if _announced.get(self.http.display) != level:
                _announced[self.http.display] = level
                log.info("LM Studio at %s speaks the %s API", self.http.display, level)
            return level, models
        raise BadResponse(f"{self.http.display} answers none of /api/v1/models, /api/v0/models, /v1/models; "
                          "is this an LM Studio server?")

    # -- health -----------------------------------------------------------------------------------

    def health(self) -> ServerInfo:
        """Probes the remembered level's list; before detection, `/api/v1/models`, then
        `/lmstudio-greeting` (what `lms` itself pings), then `/v1/models`. Never raises."""
        with self._lock:
            known = self.api_level
        paths = [_PATHS[known]] if known else ["/api/v1/models", "/lmstudio-greeting", "/v1/models"]
        last: Exception | None = None
        for path in paths:
            try:
                body = self.http.request("GET", path, profile="probe")
            except RequestFault as exc:
                last = exc
                if exc.status in (404, 405):
                    continue
                break
            except BackendError as exc:
                return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
            if isinstance(body, dict) and "error" in body and not body.get("lmstudio"):
                last = BadResponse(f"{path}: {body.get('error')!r}")
                continue
            version = body.get("version") if isinstance(body, dict) and isinstance(body.get("version"), str) else None
            return ServerInfo(healthy=True, version=version)
        return ServerInfo(healthy=False, detail=f"{type(last).__name__}: {last}" if last else "no probe answered")

    # -- catalogue and identity -------------------------------------------------------------------

    def catalogue(self) -> Catalogue:
        level, models = self._models()
        return self._catalogue(level, models)

    def _catalogue(self, level: str, models: list[dict[str, Any]]) -> Catalogue:
        if level == "v1":
            entries = {e.key: e for e in (self._v1_entry(m) for m in models) if e is not None}
            return Catalogue(tuple(entries.values()))
        if level == "v0":
            entries = {e.key: e for e in (self._v0_entry(m) for m in models)}
            return Catalogue(tuple(entries.values()), max_loaded=JIT_MAX_LOADED)
        return Catalogue(self._openai_entries([m["id"] for m in models]), complete=False, max_loaded=JIT_MAX_LOADED)

    def _openai_entries(self, ids: list[str]) -> tuple[Offered, ...]:
        """`/v1/models` lists instances by id, so a second instance shows as `key:2` beside `key` (lmstudio-js
        #180): such ids become instances of the entry `key`. Every listed model counts as loaded (with JIT on
        the list holds every downloaded model, docs:1_developer/3_openai-compat/models.md, and a chat loads it
        on first use); as a JIT load it gets the idle TTL."""
        by_key: dict[str, list[str]] = {}
        for model_id in dict.fromkeys(ids):
            suffixed = _INSTANCE_SUFFIX.fullmatch(model_id)
            by_key.setdefault(suffixed["key"] if suffixed else model_id, []).append(model_id)
        entries = []
        for key, instance_ids in by_key.items():
            base = self.listed_entry(key, ttl_seconds=JIT_IDLE_TTL_SECONDS)
            instances = tuple(replace(base.instances[0], key=i) for i in instance_ids)
            entries.append(replace(base, instances=instances))
        return tuple(entries)

    def _v1_entry(self, m: dict[str, Any]) -> LMStudioModel | None:
        """One model entry (docs:1_developer/2_rest/list.md). Loaded instances keep their own ids; REST loads
        have no TTL (the load request has no `ttl` field, docs load.md), so `ttl_seconds` stays None."""
        key = m.get("key")
        if not isinstance(key, str) or not key:
            log.debug("LM Studio at %s lists a model without a key: %s", self.http.display, truncate(str(m), 200))
            return None
        variants = tuple(v for v in m.get("variants") or () if isinstance(v, str))
        selected = m.get("selected_variant") if isinstance(m.get("selected_variant"), str) else None
        if selected is None and len(variants) == 1:
            selected = variants[0]     # the only variant is what a load of the key loads
        size = _pos_int(m.get("size_bytes"))
        instances = []
        for inst in m.get("loaded_instances") or ():
            if not isinstance(inst, dict):
                continue
            inst_id = inst.get("id") if isinstance(inst.get("id"), str) else key
            config = inst.get("config") if isinstance(inst.get("config"), dict) else {}
            instances.append(LoadedModel(key=inst_id, size_bytes=size or 0,
                                         parallel=_pos_int(config.get("parallel")) or self.default_parallel,
                                         context_length=_pos_int(config.get("context_length")), model=key))
        names = [selected] if selected else []
        names += [without_publisher(n) for n in (key, *names) if "/" in n]
        return LMStudioModel(key=key, names=tuple(dict.fromkeys(n for n in names if n != key)), size_bytes=size,
                             max_context_length=_pos_int(m.get("max_context_length")),
                             status="loaded" if instances else "unloaded", instances=tuple(instances),
                             variants=variants, selected_variant=selected)

    def _v0_entry(self, m: dict[str, Any]) -> LMStudioModel:
        """`GET /api/v0/models` (docs:1_developer/2_rest/endpoints.mdx): `state` "loaded" | "not-loaded",
        `loaded_context_length` when loaded (#1666). A loaded v0 model may have been JIT-loaded (as every load
        aibot makes there is) or loaded with `lms load`; v0 does not say which, so the JIT TTL is assumed:
        at worst aibot expects an unload that does not come, and sees the model again at the next refresh."""
        key = m["id"]
        instances = ()
        if m.get("state") == "loaded":
            instances = (LoadedModel(key=key, parallel=self.default_parallel, model=key,
                                     context_length=_pos_int(m.get("loaded_context_length")),
                                     ttl_seconds=JIT_IDLE_TTL_SECONDS),)
        alias = without_publisher(key)
        return LMStudioModel(key=key, names=(alias,) if alias != key else (),
                             max_context_length=_pos_int(m.get("max_context_length")),
                             status="loaded" if instances else "unloaded", instances=instances)

    def identify(self, wanted: str, catalogue: Catalogue) -> Offered | None:
        """The entry a configured name denotes, by LM Studio's naming:

        - the exact `key` (`the-eternal`), or an instance id (`the-eternal:2`);
        - `key@variant` when it is the entry's `selected_variant` (the variant part case-insensitively,
          `same_variant`);
        - either of these with a publisher prefix on one side only (`sim/the-eternal` ~ `the-eternal`),
          when exactly one entry fits;
        - `key@variant` naming one of the entry's OTHER variants: a stand-in with `refusal` set, so that
          `load` refuses it for good with the reason (REST load cannot pick a variant, #1462) rather than
          the loader calling the name unknown or loading the selected variant in its place;
        - a `:N` instance suffix of an entry whose instance is gone (`the-eternal:2` after an unload).
        """
        found = identify_by_names(wanted, catalogue, same_variant)
        if found is not None or not isinstance(wanted, str) or not wanted:
            return found
        others = []
        for entry in catalogue.models:
            for variant in getattr(entry, "variants", ()):
                if variant != getattr(entry, "selected_variant", None):
                    alias = without_publisher(variant)
                    others.append(((entry, variant), (variant,), (alias,) if alias != variant else ()))
        hit = match_one(wanted, others, same_variant)
        if hit is not None:
            entry, variant = hit
            selected = getattr(entry, "selected_variant", None) or entry.key
            refusal = (f"LM Studio's REST load cannot pick variant {variant!r} of {entry.key!r} (selected: "
                       f"{selected!r}; lmstudio-bug-tracker #1462); select it in LM Studio or configure the key "
                       f"{entry.key!r}")
            return LMStudioModel(key=wanted, detail=refusal, refusal=refusal, variants=(variant,),
                                 selected_variant=selected)
        suffixed = _INSTANCE_SUFFIX.fullmatch(wanted)
        if suffixed is not None:
            base = self.identify(suffixed["key"], catalogue)
            if base is not None and not getattr(base, "refusal", None):
                return base
        return None

    # -- load control -----------------------------------------------------------------------------

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Loads the entry `model` names (normally an `Offered.key`) and returns its instance.

        v1: `POST /api/v1/models/load {"model": <key>, "echo_load_config": true}`, by key only (a variant is
        refused, #1462) and never with `parallel` (rejected as unrecognized, #2024; API loads get 4, #2061:
        the real value is read back from the listing). An entry with a loaded instance is adopted, never
        loaded again: a second load adds `key:2` (#168, #1582), and a loader killed mid-load leaves the
        server finishing that load. Refusals are typed by `_load_refusal`.

        v0 and OpenAI-only: no REST load; a one-token chat completion makes LM Studio JIT-load the model.
        """
        where = f"POST {self.http.display}{LOAD_PATH}"
        level, models = self._models()
        if level != "v1":
            return self._jit_load(model, self._catalogue(level, models))
        entry = self._loadable(model, self._catalogue(level, models), where)
        if entry.instances:
            return entry.instances[0]
        body: dict[str, Any] = {"model": entry.key, "echo_load_config": True}
        if context_length is not None:
            body["context_length"] = context_length
        if parallel is not None:
            log.debug("LM Studio REST load cannot set parallel=%s for %s; the server default applies", parallel, model)
        try:
            answer = self.http.request("POST", LOAD_PATH, json_body=body, profile="load")
        except BackendError as exc:
            typed = self._load_refusal(where, entry.key, exc.body, exc.status)
            if typed is None:
                raise
            raise self.http.scrub(typed) from exc
        if isinstance(answer, dict) and "error" in answer:
            raise self.http.scrub(self._load_refusal(where, entry.key, answer, None)
                                  or embedded_error(answer, where) or BadResponse(f"{where}: {answer!r}"))
        instance_id = answer.get("instance_id") if isinstance(answer, dict) else None
        if not isinstance(instance_id, str) or not instance_id:
            raise BadResponse(f"{where}: the load answer has no instance_id: {truncate(str(answer), 200)}")
        for inst in self.catalogue().instances():
            if inst.key == instance_id:
                return inst
        config = answer.get("load_config") if isinstance(answer.get("load_config"), dict) else {}
        return LoadedModel(key=instance_id, size_bytes=entry.size_bytes or 0, parallel=self.default_parallel,
                           context_length=_pos_int(config.get("context_length")), model=entry.key)

    def _loadable(self, model: str, catalogue: Catalogue, where: str) -> Offered:
        entry = find(self, model, catalogue, where)
        refusal = getattr(entry, "refusal", None)
        if refusal:
            raise ModelUnavailable(f"{where}: {refusal}")
        return entry

    def _load_refusal(self, where: str, key: str, body: Any, status: int | None) -> BackendError | None:
        """Types a refused REST load by the error's `type` (the REST envelope `{"error": {"type", "message"}}`,
        #1462), whatever the HTTP status (undocumented). None: not a load refusal we know; typed as usual.

        - the guardrail's wording (#1202, #1038, #927) -> InsufficientResources, checked first because its
          `type` is not documented;
        - `model_not_found` ("Model X not found in downloaded models", #1462) -> ModelUnavailable (permanent);
        - `model_load_failed` (#2295: generic, can hide an out-of-memory abort) -> LoadFailed with the
          server's message: the (server, model) pair is backed off and the load tried again later.
        """
        kind, message = _rest_error(body)
        shown = f"HTTP {status}: " if status else ""
        if message and mentions_resources(message):
            return InsufficientResources(f"{where}: LM Studio refused to load {key!r} for lack of memory: "
                                         f"{shown}{message}", status=status, body=message)
        if kind == "model_not_found":
            return ModelUnavailable(f"{where}: LM Studio refused to load {key!r} ({kind}): {shown}{message}",
                                    status=status, body=message)
        if kind == "model_load_failed":
            return LoadFailed(f"{where}: LM Studio failed to load {key!r} ({kind}; LM Studio reports "
                              f"out-of-memory aborts this way too, lmstudio-bug-tracker #2295): {shown}{message}",
                              status=status, body=message)
        return None

    def _jit_load(self, model: str, catalogue: Catalogue) -> LoadedModel:
        where = f"POST {self.http.display}{CHAT_PATH}"
        found = find(self, model, catalogue, where)
        if found.instances:
            return found.instances[0]
        target = found.key
        body = {"model": target, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": False}
        answer = self.http.request("POST", CHAT_PATH, json_body=body, profile="load")
        err = embedded_error(answer, where)
        if err is not None:
            raise err
        found = self.identify(target, self.catalogue())
        if found is not None and found.instances:
            return found.instances[0]
        return LoadedModel(key=target, parallel=self.default_parallel, model=target, ttl_seconds=JIT_IDLE_TTL_SECONDS)

    def unload(self, model: str) -> None:
        """Unloads the instance with id `model` (`the-eternal:2`), and only that one; no-op if it is not
        loaded. docs:1_developer/2_rest/unload.md: `{"instance_id"}`."""
        level, models = self._models()
        if level != "v1":
            raise Unsupported(f"LM Studio at {self.http.display} speaks the {level} API; unloading needs the "
                              "0.4+ REST API (/api/v1/models/unload)")
        if model not in {i.key for i in self._catalogue(level, models).instances()}:
            return
        where = f"POST {self.http.display}{UNLOAD_PATH}"
        try:
            answer = self.http.request("POST", UNLOAD_PATH, json_body={"instance_id": model})
        except RequestFault as exc:
            if exc.status == 404:
                return   # unloaded meanwhile (TTL, another client)
            raise
        err = embedded_error(answer, where)
        if err is not None:
            raise err


def _rest_error(body: Any) -> tuple[str | None, str | None]:
    """(`error.type`, `error.message`) of an error body, parsed or as (possibly truncated) text."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            found = _ERROR_TYPE.search(body)
            return (found["type"] if found else None), body
    if not isinstance(body, dict) or "error" not in body:
        return None, None
    err = body["error"]
    kind = err.get("type") if isinstance(err, dict) and isinstance(err.get("type"), str) else None
    return kind, error_text(body)


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

