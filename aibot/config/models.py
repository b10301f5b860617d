"""Pydantic models of the entity configuration (`config-aientities.json`).

The original bot's file must load unchanged, so every key it ever used is declared here, including
keys aibot ignores (declared so they are not reported as unknown; docs/configuration.md says which
and why). Python attributes are snake_case; JSON may use the original camelCase or snake_case, and a
few fields also accept their historical names (`maxTokens`/`max_tokens`, `nom`/`messagesToRead`/
`contextWindow`). Unknown keys are kept (`extra="allow"`) so the loader can report them as warnings
with their paths instead of failing on a typo or a newer key.

Types are strict (JSON `"yes"` is not a boolean, `"5"` is not a number) because a config that means
something other than what it says is worse than one that fails to load. Cross-field rules (model id
resolvable, unique ids, missing rate limits) live in the loader, which knows the JSON paths.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from aibot.config import escapes
from aibot.config.color import parse_color
from aibot.config.issues import Issue

GB = 1_000_000_000  # capabilities.maxMemory and the *GB settings are decimal gigabytes
DEFAULT_USER_PROMPT = "Generate a response based on the conversation context."
DEFAULT_CONTEXT_TOKEN_BUDGET = 8192 - 500  # the original DO-era bot's budget (doc 228)


def _aliases(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class ConfigModel(BaseModel):
    """Shared settings: camelCase or snake_case input, strict types, unknown keys kept."""

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        populate_by_name=True,
        alias_generator=AliasGenerator(
            validation_alias=lambda name: AliasChoices(to_camel(name), name),
            serialization_alias=to_camel,
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """JSON `null` for a setting that has a non-null default means "use the default", as the
        original's `value || default` reads did (e.g. `"filterOut": null`)."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        defaulted = _defaulted_inputs(cls)
        return {k: v for k, v in data.items() if not (v is None and k in defaulted)}


@functools.cache
def _defaulted_inputs(cls: type[BaseModel]) -> frozenset[str]:
    names: set[str] = set()
    for name, info in cls.model_fields.items():
        if info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        if default is not None:
            alias = info.validation_alias
            names.update(alias.choices if isinstance(alias, AliasChoices) else [alias or name])
            names.add(name)
    return frozenset(n for n in names if isinstance(n, str))


def _escape_mode(info: ValidationInfo) -> str:
    ctx = info.context or {}
    return ctx.get("escapes") or escapes.DEFAULT_MODE


# ---------------------------------------------------------------- entities


class Quantization(ConfigModel):
    model_path: str | None = None
    enabled: bool = True  # accepted; the original never read it and neither does aibot


class RateLimits(ConfigModel):
    """Per-entity throttle; a missing limit (None) means no limit on that window."""

    min_seconds_between_posts: float | None = Field(None, ge=0)
    max_posts_per_minute: int | None = Field(None, ge=0)
    max_posts_per_hour: int | None = Field(None, ge=0)


class Entity(ConfigModel):
    id: str = Field(min_length=1)
    enabled: bool = True
    username: str = Field(min_length=1)
    color: str

    # model naming (see aibot.config.modelid)
    model: str | None = None
    base_model: str | None = None
    quantizations: dict[str, Quantization] = Field(default_factory=dict)
    default_quantization: str | None = None
    model_server: str | None = None  # accepted, ignored: the server's `kind` picks the backend

    # prompt
    system_role: Literal["system", "assistant", "user"] = "system"
    system_prompt: str = ""
    user_prompt: str = DEFAULT_USER_PROMPT
    nom: int = Field(100, ge=0, validation_alias=_aliases("nom", "messagesToRead", "messages_to_read",
                                                          "contextWindow", "context_window"))
    prompt_mode: Literal["messages", "legacy"] = "messages"
    context_token_budget: int = Field(DEFAULT_CONTEXT_TOKEN_BUDGET, ge=1)
    add_newline_to_context: bool = False
    add_entity_username: bool = False

    # queue
    default_priority: int | None = Field(None, ge=0, le=99)
    max_attempts: int | None = Field(None, ge=1)

    # sampler; None = not sent, the server's default applies
    temperature: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1, validation_alias=_aliases("maxTokens", "max_tokens"))
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    rate_limits: RateLimits | None = None

    # reply post-processing
    filter_out: list[str] = Field(default_factory=list)
    trim_after: list[str] = Field(default_factory=list)
    trim_whitespace: bool = False
    stop_sequences: list[str] = Field(default_factory=list)

    # accepted and ignored (pre-queue era or later product features; see docs/configuration.md)
    response_chance: float | None = None
    conversation_settings: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    greeting: str | None = None
    add_variable_to_context: Any = None
    init_context: Any = None
    special_handler: str | None = None

    @field_validator("color")
    @classmethod
    def _color(cls, value: str) -> str:
        return parse_color(value)

    @field_validator("system_prompt", "user_prompt")
    @classmethod
    def _unescape_text(cls, value: str, info: ValidationInfo) -> str:
        return escapes.apply(value, _escape_mode(info))

    @field_validator("filter_out", "trim_after", "stop_sequences")
    @classmethod
    def _unescape_list(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return escapes.apply_all(value, _escape_mode(info))


# ---------------------------------------------------------------- servers


class Capabilities(ConfigModel):
    max_memory: float | None = Field(None, gt=0)  # GB (10^9 bytes)
    supported_formats: list[str] = Field(default_factory=list)  # informational


class ServerConfig(ConfigModel):
    """One inference server: the original `{ip, port, enabled, name, capabilities}` plus aibot's
    sizing knobs (defaults from the seed: 8 GB system reserve, 10 % safety, 3 GB per request, cap 12)."""

    name: str | None = None  # filled in: `ip:port` (or host:port of `url`)
    ip: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None  # filled in: http://ip:port
    kind: str = "lmstudio"  # one of aibot.backends.registry.kinds()
    enabled: bool = True
    capabilities: Capabilities = Field(default_factory=Capabilities)
    system_reserve_gb: float = Field(8.0, ge=0, validation_alias=_aliases(
        "systemReserveGB", "systemReserveGb", "system_reserve_gb"))
    safety_fraction: float = Field(0.10, ge=0, lt=1)
    per_request_gb: float = Field(3.0, gt=0, validation_alias=_aliases(
        "perRequestGB", "perRequestGb", "per_request_gb"))
    hard_cap: int = Field(12, ge=1)
    default_parallel: int = Field(1, ge=1)
    token_env: str | None = None  # name of the environment variable holding the API token
    # Models the server keeps loaded before it evicts the least recently used one by itself, when the
    # server does not report it (llama.cpp router `--models-max`, Ollama OLLAMA_MAX_LOADED_MODELS).
    max_loaded_models: int | None = Field(None, ge=1)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from aibot.backends import registry

        if value not in registry.kinds():
            raise ValueError(f"unknown server kind {value!r}; expected one of "
                             f"{', '.join(repr(k) for k in registry.kinds())}")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = value.strip().rstrip("/")
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise ValueError(f"url {value!r} must start with http:// or https:// and name a host")
        return url

    @model_validator(mode="after")
    def _fill_address(self) -> ServerConfig:
        if self.url is None:
            if not self.ip:
                raise ValueError("a server needs `ip` (with `port`) or `url`")
            from aibot.backends import registry

            port = self.port if self.port is not None else registry.default_port(self.kind)
            if port is None:
                raise ValueError(f"a server of kind {self.kind!r} needs an explicit `port` or `url`")
            self.port = port
            self.url = f"http://{self.ip}:{port}"
        if not self.name:
            self.name = self.url.split("://", 1)[1].split("/", 1)[0] if not self.ip else f"{self.ip}:{self.port}"
        return self

    @property
    def memory_bytes(self) -> int | None:
        mem = self.capabilities.max_memory
        return None if mem is None else int(round(mem * GB))

    @property
    def system_reserve_bytes(self) -> int:
        return int(round(self.system_reserve_gb * GB))

    @property
    def per_request_bytes(self) -> int:
        return int(round(self.per_request_gb * GB))


# ---------------------------------------------------------------- top-level sections


class BotSettings(ConfigModel):
    polling_interval_ms: int = Field(30000, ge=1, validation_alias=_aliases(
        "pollingInterval", "polling_interval", "pollingIntervalMs", "polling_interval_ms"))
    websocket_port: int = Field(4002, ge=1, le=65535)
    enable_console_logs: bool | None = None  # never read by the original either
    min_seconds_between_any_post: float | None = Field(None, ge=0)  # proposed, never built
    max_total_messages_per_minute: int | None = Field(None, ge=0)  # proposed, never built


class QueueSettings(ConfigModel):
    enabled: bool = True  # the original's "direct mode" only logged an error; aibot always queues
    # The cluster-wide cap on generations in flight (None: only the slots limit); see docs/cluster.md.
    max_concurrent_workers: int | None = Field(None, ge=1)
    stale_claim_timeout_ms: int = Field(60000, ge=1, validation_alias=_aliases(
        "staleClaimTimeout", "stale_claim_timeout", "staleClaimTimeoutMs", "stale_claim_timeout_ms"))
    max_retries: int = Field(3, ge=1)
    default_priority: int = Field(50, ge=0, le=99)
    congestion_threshold: int | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=0)


class RouterSettings(ConfigModel):
    """Accepted, ignored: the original only logged `enabled`; the router LLM was never built."""

    enabled: bool = False
    primary_model: str | None = None
    fallback_model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = Field(None, validation_alias=_aliases("maxTokens", "max_tokens"))


class ClusterSettings(ConfigModel):
    poll_interval_ms: int = Field(5000, ge=1, validation_alias=_aliases(
        "pollInterval", "poll_interval", "pollIntervalMs", "poll_interval_ms"))
    max_load_attempts: int = Field(60, ge=1)
    load_balancing_strategy: Literal["model-affinity", "least-loaded", "round-robin"] = "model-affinity"
    keep_models_loaded: bool = True
    model_load_timeout_ms: int = Field(120000, ge=1, validation_alias=_aliases(
        "modelLoadTimeout", "model_load_timeout", "modelLoadTimeoutMs", "model_load_timeout_ms"))
    request_timeout_ms: int = Field(30000, ge=1, validation_alias=_aliases(
        "requestTimeout", "request_timeout", "requestTimeoutMs", "request_timeout_ms"))
    health_check_interval_ms: int = Field(10000, ge=1, validation_alias=_aliases(
        "healthCheckInterval", "health_check_interval", "healthCheckIntervalMs", "health_check_interval_ms"))
    max_retries: int = Field(3, ge=0)
    model_unload_delay_ms: int = Field(300000, ge=0, validation_alias=_aliases(
        "modelUnloadDelay", "model_unload_delay", "modelUnloadDelayMs", "model_unload_delay_ms"))
    # aibot's demand scheduling (docs/cluster.md "Demand"): minimum residency = perLoadSecond × the
    # model's load time within [floor, cap]; replicas when queued > replicaQueueFactor × its slots.
    min_residency_seconds: float = Field(120.0, ge=0)
    min_residency_floor_seconds: float = Field(5.0, ge=0)
    residency_per_load_second: float = Field(10.0, ge=0)
    replica_queue_factor: float = Field(2.0, gt=0)
    max_replicas: int | None = Field(None, ge=1)
    # docs/cluster.md "Adaptive concurrency": each (server, model)'s slots settle at the knee of its
    # measured tokens/s curve instead of the server's full `parallel`. Off by default (see there why).
    adaptive_concurrency: bool = False

    @model_validator(mode="after")
    def _residency_range(self) -> "ClusterSettings":
        if self.min_residency_floor_seconds > self.min_residency_seconds:
            raise ValueError(f"clusterSettings.minResidencyFloorSeconds ({self.min_residency_floor_seconds:g}) must "
                             f"not exceed clusterSettings.minResidencySeconds ({self.min_residency_seconds:g})")
        return self


class GlobalSettings(ConfigModel):
    global_filter_out: list[str] = Field(default_factory=list)
    global_trim_after: list[str] = Field(default_factory=list)
    global_stop_sequences: list[str] = Field(default_factory=list)
    escapes: Literal["unescape", "literal"] | None = None

    # accepted, ignored (early global throttle, documentation-only blocks, September leftovers)
    min_time_between_messages: float | None = None
    max_messages_per_minute: float | None = None
    require_human_activity: bool | None = None
    default_model: str | None = None
    cloudflare_worker_rate_limits: dict[str, Any] | None = None
    brand_name: str | None = None
    default_entity: str | None = None
    context_window: int | None = None
    messages_to_read: int | None = None

    @field_validator("global_filter_out", "global_trim_after", "global_stop_sequences")
    @classmethod
    def _unescape_list(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return escapes.apply_all(value, _escape_mode(info))


class Monitoring(ConfigModel):
    """Accepted, ignored (the original's SUGGESTED config only)."""

    enable_dashboard: bool | None = None
    enable_metrics: bool | None = None
    metrics_retention: Any = None


class ModelSettings(ConfigModel):
    """Per-model facts the servers may not report (`"models": {"<model id>": {...}}` at the top level)."""

    size_gb: float | None = Field(None, gt=0, validation_alias=_aliases("sizeGB", "sizeGb", "size_gb"))
    # Unloaded once idle this long (nothing queued, nothing in flight), even with keepModelsLoaded.
    idle_ttl_seconds: float | None = Field(None, ge=0)

    @property
    def size_bytes(self) -> int | None:
        return None if self.size_gb is None else int(round(self.size_gb * GB))


class BotConfig(ConfigModel):
    version: str = "v1.0"
    escapes: Literal["unescape", "literal"] | None = None
    bot_settings: BotSettings = Field(default_factory=BotSettings)
    queue_settings: QueueSettings = Field(default_factory=QueueSettings)
    router_settings: RouterSettings = Field(default_factory=RouterSettings)
    cluster_settings: ClusterSettings = Field(default_factory=ClusterSettings)
    global_settings: GlobalSettings = Field(default_factory=GlobalSettings)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    lm_studio_servers: list[ServerConfig] = Field(default_factory=list)
    # aibot's own top-level `servers` list (same shape); `.servers` is both lists together.
    extra_servers: list[ServerConfig] = Field(default_factory=list, validation_alias=AliasChoices("servers"),
                                              serialization_alias="servers")
    entities: list[Entity]
    # aibot's own: per-model settings by model id (the name entities resolve to, or a server's name)
    models: dict[str, ModelSettings] = Field(default_factory=dict)

    _warnings: list[Issue] = PrivateAttr(default_factory=list)
    _source: str = PrivateAttr(default="")
    _by_id: dict[str, Entity] | None = PrivateAttr(default=None)
    _servers: list[ServerConfig] = PrivateAttr(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _merge_servers(self) -> BotConfig:
        self._servers = [*self.lm_studio_servers, *self.extra_servers]
        return self

    @property
    def servers(self) -> list[ServerConfig]:
        """Every configured server: `lmStudioServers` first, then `servers`."""
        return self._servers

    @property
    def warnings(self) -> list[Issue]:
        return self._warnings

    @property
    def source(self) -> str:
        return self._source

    @property
    def escape_mode(self) -> str:
        return self.escapes or self.global_settings.escapes or escapes.DEFAULT_MODE

    def entity(self, entity_id: str) -> Entity | None:
        if self._by_id is None:
            self._by_id = {e.id: e for e in self.entities}
        return self._by_id.get(entity_id)

    def model_settings(self, model: str) -> ModelSettings | None:
        return self.models.get(model)

    def server(self, name: str) -> ServerConfig | None:
        return next((s for s in self.servers if s.name == name), None)

    def default_priority_for(self, entity: Entity) -> int:
        """The priority of a message that names none: the entity's, else the queue default (0 is valid)."""
        if entity.default_priority is not None:
            return entity.default_priority
        return self.queue_settings.default_priority

    def max_attempts_for(self, entity: Entity) -> int:
        return entity.max_attempts if entity.max_attempts is not None else self.queue_settings.max_retries
