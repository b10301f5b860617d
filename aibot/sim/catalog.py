"""The models a simulated server has "on disk": sizes drive load time and memory, so they must be explicit.

Sizes use decimal gigabytes (`GB = 10**9`), the unit LM Studio prints and the seed's arithmetic uses
("6 × 15GB = 90GB" on a 128 GB Mac Studio).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

GB = 10**9


class CatalogError(ValueError):
    """A model specification is invalid; the message names the field and value."""


@dataclass(frozen=True)
class ModelSpec:
    key: str
    size_bytes: int
    context_length: int = 4096          # context used when loaded without an explicit one
    max_context_length: int = 32768
    parallel: int = 4                   # LM Studio 0.4's default "Max Concurrent Predictions"
    publisher: str = "sim"
    arch: str = "llama"
    quantization: str = "F16"
    bits_per_weight: int = 16
    params_string: str = "27B"
    type: str = "llm"
    format: str = "gguf"
    display_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.strip():
            raise CatalogError(f"model.key: {self.key!r} must be a non-empty string")
        if not isinstance(self.size_bytes, int) or self.size_bytes <= 0:
            raise CatalogError(f"model {self.key!r}.size_bytes: {self.size_bytes!r} must be a positive integer")
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise CatalogError(f"model {self.key!r}.parallel: {self.parallel!r} must be an integer >= 1")
        if not isinstance(self.context_length, int) or self.context_length < 1:
            raise CatalogError(f"model {self.key!r}.context_length: {self.context_length!r} must be >= 1")
        if self.max_context_length < self.context_length:
            raise CatalogError(f"model {self.key!r}.max_context_length: {self.max_context_length!r} "
                               f"is below context_length {self.context_length}")

    @property
    def name(self) -> str:
        return self.display_name or self.key.split("/")[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "model") -> ModelSpec:
        """Accepts `size_gb` as a friendlier alternative to `size_bytes` (spec files are hand-written)."""
        if not isinstance(data, Mapping):
            raise CatalogError(f"{where}: expected an object, got {data!r}")
        d = dict(data)
        if "size_gb" in d:
            gb = d.pop("size_gb")
            if not isinstance(gb, (int, float)) or gb <= 0:
                raise CatalogError(f"{where}.size_gb: {gb!r} must be a positive number")
            d.setdefault("size_bytes", int(gb * GB))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CatalogError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if "key" not in d or "size_bytes" not in d:
            raise CatalogError(f"{where}: 'key' and 'size_bytes' (or 'size_gb') are required")
        return cls(**d)


def uniform_catalog(count: int, size_gb: float, *, parallel: int = 4, prefix: str = "sim/model-",
                    quantization: str = "F16", context_length: int = 4096) -> list[ModelSpec]:
    """`count` same-sized models, the seed's shape (six 15 GB f16 models), named as the original
    configuration names them: `<base>@<quant>` (`sim/model-1@f16`), so every flavour shows them the way
    its real server would (LM Studio: key `sim/model-1` with variant `sim/model-1@f16`)."""
    if count < 1:
        raise CatalogError(f"models: count {count!r} must be >= 1")
    if size_gb <= 0:
        raise CatalogError(f"model_gb: {size_gb!r} must be positive")
    return [ModelSpec(key=f"{prefix}{i}@{quantization.lower()}", size_bytes=int(size_gb * GB), parallel=parallel,
                      quantization=quantization, context_length=context_length)
            for i in range(1, count + 1)]


def default_catalog() -> list[ModelSpec]:
    """A small mixed catalogue: big f16 models like the seed's, and tiny ones for fast tests."""
    return [
        ModelSpec("sim/the-eternal-f16", 15 * GB, arch="llama", params_string="8B"),
        ModelSpec("sim/philosophy-f16", 15 * GB, arch="llama", params_string="8B"),
        ModelSpec("google/gemma-3-27b", 17 * GB, arch="gemma3", quantization="Q4_K_M", bits_per_weight=4),
        ModelSpec("sim/llama-70b-q4", 40 * GB, arch="llama", quantization="Q4_K_M", bits_per_weight=4,
                  params_string="70B"),
        ModelSpec("sim/tiny-1", 1 * GB, params_string="270M", parallel=4),
        ModelSpec("sim/tiny-2", 2 * GB, params_string="1B", parallel=4),
    ]


# --------------------------------------------------------------------------------------------- LM Studio names
#
# LM Studio lists ONE entry per downloaded model: a `key` without `@` and, for models with several
# quantizations on disk, `variants` named `key@quant` with one `selected_variant` ("what will be used once
# this model is loaded"): lmstudio-ai/docs 1_developer/2_rest/list.md; lmstudio-js
# packages/lms-shared-types/src/ModelInfoBase.ts:68-86 @6ec11db1; lmstudio-bug-tracker #1462 shows
# `"key": "mistralai/mistral-small-3.2"` with variants `...@q4_k_m`, `...@q8_0`.
#
# Tests, the demo and configs name a simulated model by its spec key, the name their aibot config uses
# (`sim/model-1`, `the-eternal@f16`); the engine keeps counting by that key. The LM Studio flavour shows
# the specs grouped the way LM Studio would: a spec `the-eternal@f16` is variant `the-eternal@f16` of
# key `the-eternal`; a spec without `@` (`sim/model-1`, quantization F16) is variant `sim/model-1@f16` of
# key `sim/model-1`. Specs sharing a key are that key's variants; the first one declared is selected.


def lmstudio_key(spec: ModelSpec) -> str:
    """The LM Studio model key a spec is listed under (and its instances are named after)."""
    base, at, _ = spec.key.rpartition("@")
    return base if at else spec.key


def lmstudio_variant(spec: ModelSpec) -> str:
    """The variant name (`key@quant`, quant in lower case as LM Studio writes it: the documented example
    pairs `quantization.name` "Q4_K_M" with variant `google/gemma-4-26b-a4b@q4_k_m`)."""
    return spec.key if "@" in spec.key else f"{spec.key}@{spec.quantization.lower()}"


def lmstudio_quantization(spec: ModelSpec) -> str:
    """`quantization.name` for the listing: the variant's own suffix when the key carries one."""
    suffix = lmstudio_variant(spec).rpartition("@")[2]
    return spec.quantization if spec.quantization.lower() == suffix else suffix.upper()


@dataclass(frozen=True)
class VariantGroup:
    """One LM Studio model entry: its key and its variants' specs, the selected one first."""

    key: str
    specs: tuple[ModelSpec, ...]

    @property
    def selected(self) -> ModelSpec:
        return self.specs[0]

    def variant_names(self) -> list[str]:
        return [lmstudio_variant(s) for s in self.specs]


def variant_groups(catalog: Mapping[str, ModelSpec]) -> dict[str, VariantGroup]:
    """{LM Studio key: group}, in declaration order; two specs claiming one variant name are an error."""
    specs: dict[str, list[ModelSpec]] = {}
    seen: dict[str, str] = {}
    for spec in catalog.values():
        variant = lmstudio_variant(spec)
        if variant in seen:
            raise CatalogError(f"models: {spec.key!r} and {seen[variant]!r} are both LM Studio variant {variant!r}; "
                               "give one of them another quantization or an explicit '@quant' key")
        seen[variant] = spec.key
        specs.setdefault(lmstudio_key(spec), []).append(spec)
    return {key: VariantGroup(key, tuple(group)) for key, group in specs.items()}


def as_catalog(models: Iterable[ModelSpec | Mapping[str, Any]] | None) -> dict[str, ModelSpec]:
    """Normalises a list of specs or dicts into {key: spec}, refusing duplicate keys."""
    out: dict[str, ModelSpec] = {}
    for i, m in enumerate(default_catalog() if models is None else models):
        spec = m if isinstance(m, ModelSpec) else ModelSpec.from_dict(m, where=f"models[{i}]")
        if spec.key in out:
            raise CatalogError(f"models[{i}].key: {spec.key!r} appears twice")
        out[spec.key] = spec
    if not out:
        raise CatalogError("models: the catalogue is empty")
    return out
