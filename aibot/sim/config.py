"""`SimConfig`: everything that shapes one simulated server, validated up front with field-named errors.

Times are given in "real" seconds and multiplied by `speed`, so one config describes a realistic
Mac Studio (`speed=1`: ~3 s replies, ~30 s cold loads of 15 GB) and its test double (`speed=0.001`).
Fault times are the exception (see `aibot.sim.faults`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aibot.sim.catalog import GB, ModelSpec, as_catalog
from aibot.sim.faults import FaultConfig

APIS = ("lmstudio", "openai", "llamacpp", "llamacpp-router", "ollama")
LMSTUDIO_VERSIONS = ("0.4", "0.3", "openai-only")
# How an LM Studio REST load that runs out of memory answers: the generic `model_load_failed`
# (lmstudio-bug-tracker #2295, 0.4.21) or the guardrail refusal text (#1202, #1038).
LMSTUDIO_LOAD_FAILURES = ("model_load_failed", "guardrail")
# 4 concurrent requests finish in ~1.4x the time of one (real-llm.md): 1 + alpha*(4-1) = 1.4.
DEFAULT_BATCH_ALPHA = 0.4 / 3


class SimConfigError(ValueError):
    pass


@dataclass
class SimConfig:
    api: str = "lmstudio"
    name: str = "sim"
    host: str = "127.0.0.1"
    port: int = 0
    models: list[ModelSpec] | None = None        # None = catalog.default_catalog()
    preloaded: list[str] | str = field(default_factory=list)   # keys, or "all"; loaded instantly at start
    memory_bytes: int | None = None              # budget for loaded models (+ request buffers); None = no limit
    per_request_bytes: int = 0                   # memory held by each generating request
    parallel: int | None = None                  # overrides every model's default parallel
    server_parallel: int | None = None           # cap on generating requests across all models (1 = global lock)
    jit: bool = True                             # load on first chat request (LM Studio, Ollama, router)
    jit_race: bool = False                       # concurrent JIT requests each load a copy (lmstudio-bug-tracker #1751)
    load_duplicates: bool = True                 # REST load of a loaded model adds an instance "key:2"
    speed: float = 1.0
    seconds_per_gb: float = 2.0                  # 15 GB -> 30 s cold load at speed 1
    load_overhead_seconds: float = 0.5
    ttft_seconds: float = 0.2
    prompt_token_seconds: float = 0.0002
    per_token_seconds: float = 0.025
    reply_tokens: int = 110                      # 0.2 + 110 * 0.025 ≈ 3 s per reply at speed 1
    batch_alpha: float = DEFAULT_BATCH_ALPHA
    batch_curve: list[float] | None = None       # explicit multipliers for k = 1, 2, ...; overrides alpha
    step_seconds: float = 0.002                  # shortest real sleep while generating
    lmstudio_version: str = "0.4"
    api_token: str | None = field(default=None, repr=False)
    unknown_endpoint_status: int = 200           # LM Studio: "... Returning 200 anyway" (lmstudio-bug-tracker #618, #1323)
    # LM Studio JIT: idle TTL of JIT-loaded models (default 60 min) and Auto-Evict ("at most 1 model is kept
    # loaded in memory at a time (when loaded via JIT)", default on): lmstudio-ai/docs
    # 1_developer/0_core/ttl-and-auto-evict.md. TTL in wall-clock seconds (not scaled by `speed`); None = never.
    lmstudio_jit_ttl_seconds: float | None = 3600.0
    lmstudio_auto_evict: bool = True
    lmstudio_load_failure: str = "model_load_failed"   # or "guardrail"; see LMSTUDIO_LOAD_FAILURES
    skip_rate: float = 0.0                       # replies that are exactly "[SKIP]"
    human_tail_rate: float = 0.0                 # replies that end with "\nHuman: ..."
    ollama_keep_alive: str = "5m"                 # OLLAMA_KEEP_ALIVE (envconfig/config.go KeepAlive)
    ollama_max_loaded_models: int = 0            # OLLAMA_MAX_LOADED_MODELS; 0 = Ollama's automatic 3 (sched.go)
    # llama.cpp `llama-server` options (what each does, with its source: aibot/sim/apis/llamacpp.py)
    models_max: int | None = None                # router `--models-max`; None = its default 4, 0 = unlimited
    sleep_idle_seconds: float | None = None      # `--sleep-idle-seconds` (wall clock); None = never (default -1)
    broken_models: list[str] = field(default_factory=list)   # presets whose model file is broken: loads fail
    model_aliases: dict[str, list[str]] = field(default_factory=dict)   # preset `alias = a,b`
    metrics: bool = False                        # `--metrics` (without it /metrics answers 501)
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise SimConfigError(f"SimConfig.api: {self.api!r} must be one of {', '.join(APIS)}")
        if self.lmstudio_version not in LMSTUDIO_VERSIONS:
            raise SimConfigError(f"SimConfig.lmstudio_version: {self.lmstudio_version!r} must be one of "
                                 f"{', '.join(LMSTUDIO_VERSIONS)}")
        if self.lmstudio_load_failure not in LMSTUDIO_LOAD_FAILURES:
            raise SimConfigError(f"SimConfig.lmstudio_load_failure: {self.lmstudio_load_failure!r} must be one of "
                                 f"{', '.join(LMSTUDIO_LOAD_FAILURES)}")
        ttl = self.lmstudio_jit_ttl_seconds
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            raise SimConfigError(f"SimConfig.lmstudio_jit_ttl_seconds: {ttl!r} must be None or a positive number")
        if not isinstance(self.lmstudio_auto_evict, bool):
            raise SimConfigError(f"SimConfig.lmstudio_auto_evict: {self.lmstudio_auto_evict!r} must be true or false")
        if not isinstance(self.unknown_endpoint_status, int) or not 100 <= self.unknown_endpoint_status <= 599:
            raise SimConfigError(f"SimConfig.unknown_endpoint_status: {self.unknown_endpoint_status!r} must be an "
                                 "HTTP status (100..599)")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise SimConfigError(f"SimConfig.port: {self.port!r} must be 0..65535")
        if not isinstance(self.speed, (int, float)) or self.speed <= 0:
            raise SimConfigError(f"SimConfig.speed: {self.speed!r} must be a positive number")
        for f in ("seconds_per_gb", "load_overhead_seconds", "ttft_seconds", "prompt_token_seconds",
                  "per_token_seconds", "batch_alpha", "step_seconds", "per_request_bytes"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v < 0:
                raise SimConfigError(f"SimConfig.{f}: {v!r} must be a number >= 0")
        if not isinstance(self.reply_tokens, int) or self.reply_tokens < 1:
            raise SimConfigError(f"SimConfig.reply_tokens: {self.reply_tokens!r} must be an integer >= 1")
        if not isinstance(self.ollama_max_loaded_models, int) or self.ollama_max_loaded_models < 0:
            raise SimConfigError(f"SimConfig.ollama_max_loaded_models: {self.ollama_max_loaded_models!r} must be "
                                 f"an integer >= 0 (0 = automatic)")
        for f in ("parallel", "server_parallel"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise SimConfigError(f"SimConfig.{f}: {v!r} must be None or an integer >= 1")
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0):
            raise SimConfigError(f"SimConfig.memory_bytes: {self.memory_bytes!r} must be None or a positive integer")
        if self.batch_curve is not None:
            if not self.batch_curve or any(not isinstance(x, (int, float)) or x <= 0 for x in self.batch_curve):
                raise SimConfigError(f"SimConfig.batch_curve: {self.batch_curve!r} must be a non-empty list of "
                                     f"positive multipliers")
        for f in ("skip_rate", "human_tail_rate"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise SimConfigError(f"SimConfig.{f}: {v!r} must be between 0 and 1")
        if self.api_token is not None and (not isinstance(self.api_token, str) or not self.api_token):
            raise SimConfigError("SimConfig.api_token: must be a non-empty string or None")
        if not isinstance(self.faults, FaultConfig):
            self.faults = FaultConfig.from_dict(self.faults)
        self.catalog = as_catalog(self.models)
        if self.preloaded == "all":
            self.preloaded = list(self.catalog)
        if isinstance(self.preloaded, str):
            raise SimConfigError(f"SimConfig.preloaded: {self.preloaded!r} must be a list of model keys or 'all'")
        for i, key in enumerate(self.preloaded):
            if key not in self.catalog:
                raise SimConfigError(f"SimConfig.preloaded[{i}]: {key!r} is not in the model catalogue "
                                     f"({', '.join(self.catalog)})")
        self._check_llamacpp_options()

    def _check_llamacpp_options(self) -> None:
        if self.models_max is not None and (not isinstance(self.models_max, int) or isinstance(self.models_max, bool)
                                            or self.models_max < 0):
            raise SimConfigError(f"SimConfig.models_max: {self.models_max!r} must be None or an integer >= 0")
        if self.sleep_idle_seconds is not None and (not isinstance(self.sleep_idle_seconds, (int, float))
                                                    or self.sleep_idle_seconds <= 0):
            raise SimConfigError(f"SimConfig.sleep_idle_seconds: {self.sleep_idle_seconds!r} must be None or a "
                                 f"positive number")
        for i, key in enumerate(self.broken_models):
            if key not in self.catalog:
                raise SimConfigError(f"SimConfig.broken_models[{i}]: {key!r} is not in the model catalogue")
            if key in self.preloaded:
                raise SimConfigError(f"SimConfig.broken_models[{i}]: {key!r} is also preloaded, and a broken "
                                     "model cannot be loaded; start without it and load it to see it fail")
        if not isinstance(self.model_aliases, Mapping):
            raise SimConfigError(f"SimConfig.model_aliases: {self.model_aliases!r} must map model keys to alias lists")
        seen: dict[str, str] = {}
        for key, aliases in self.model_aliases.items():
            if key not in self.catalog:
                raise SimConfigError(f"SimConfig.model_aliases: {key!r} is not in the model catalogue")
            if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
                raise SimConfigError(f"SimConfig.model_aliases[{key!r}]: {aliases!r} must be a list of names")
            for alias in aliases:
                # the router refuses to start on a clash (llama.cpp tools/server/server-models.cpp add_model)
                other = alias if alias in self.catalog else seen.get(alias)
                if other is not None and other != key:
                    raise SimConfigError(f"SimConfig.model_aliases[{key!r}]: alias {alias!r} conflicts with "
                                         f"model {other!r}")
                seen[alias] = key

    @property
    def memory_gb(self) -> float | None:
        return None if self.memory_bytes is None else self.memory_bytes / GB

    def parallel_for(self, spec: ModelSpec) -> int:
        """Ollama's parallelism is one server setting, OLLAMA_NUM_PARALLEL, default 1 (ollama/ollama
        envconfig/config.go `NumParallel`, server/sched.go `load`), which `parallel` stands for there."""
        if self.api == "ollama":
            return self.parallel or 1
        return self.parallel or spec.parallel

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "server") -> SimConfig:
        """From a JSON spec: accepts `memory_gb` and model dicts; unknown keys are errors naming them."""
        if not isinstance(data, Mapping):
            raise SimConfigError(f"{where}: expected an object, got {data!r}")
        d = dict(data)
        if "memory_gb" in d:
            gb = d.pop("memory_gb")
            if gb is not None and (not isinstance(gb, (int, float)) or gb <= 0):
                raise SimConfigError(f"{where}.memory_gb: {gb!r} must be a positive number")
            d["memory_bytes"] = None if gb is None else int(gb * GB)
        if "per_request_gb" in d:
            d["per_request_bytes"] = int(d.pop("per_request_gb") * GB)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SimConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if "models" in d and d["models"] is not None:
            d["models"] = [m if isinstance(m, ModelSpec) else ModelSpec.from_dict(m, where=f"{where}.models[{i}]")
                           for i, m in enumerate(d["models"])]
        if "faults" in d and not isinstance(d["faults"], FaultConfig):
            d["faults"] = FaultConfig.from_dict(d["faults"])
        if "batch_curve" in d and d["batch_curve"] is not None:
            d["batch_curve"] = list(d["batch_curve"])
        try:
            return cls(**d)
        except SimConfigError as exc:
            raise SimConfigError(f"{where}: {exc}") from None
