"""Several simulated servers at once, from a JSON spec or from the seed's shape.

The seed (docs: lm-studio-parallel-processing.md) is two 128 GB Mac Studios with six 15 GB f16 models;
here one serves each model with parallel 1 and the other with parallel 4, so a dispatcher's sizing and
placement decisions have something to get right. `speed` scales every simulated duration.

Spec file format (`aibot sim --spec cluster.json`):

    {
      "defaults": {"api": "lmstudio", "speed": 0.01, "models": {"count": 6, "size_gb": 15}},
      "servers": [
        {"name": "mac-studio-1", "memory_gb": 128, "parallel": 1},
        {"name": "mac-studio-2", "memory_gb": 128, "parallel": 4, "faults": {"error_rate": 0.05}}
      ]
    }

Each server is `defaults` overlaid with its own entry, then read as `SimConfig` fields (plus `memory_gb`,
and `models` as a list of model objects or a `{"count", "size_gb", "parallel", "prefix"}` shorthand).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aibot.sim.catalog import uniform_catalog
from aibot.sim.config import SimConfig, SimConfigError
from aibot.sim.server import SimServer

SEED_SERVERS = ("mac-studio-1", "mac-studio-2")


def _models_shorthand(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"count", "size_gb", "parallel", "prefix", "quantization"})
        if unknown:
            raise SimConfigError(f"{where}.models: unknown field(s) {', '.join(unknown)}")
        if "count" not in value or "size_gb" not in value:
            raise SimConfigError(f"{where}.models: 'count' and 'size_gb' are required in the shorthand form")
        return uniform_catalog(int(value["count"]), float(value["size_gb"]), parallel=int(value.get("parallel", 4)),
                               prefix=str(value.get("prefix", "sim/model-")),
                               quantization=str(value.get("quantization", "F16")))
    return value


@dataclass
class ClusterSpec:
    servers: list[SimConfig]

    def __post_init__(self) -> None:
        names = [s.name for s in self.servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SimConfigError(f"servers: duplicate name(s) {', '.join(dupes)}")
        if not self.servers:
            raise SimConfigError("servers: at least one server is required")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterSpec:
        if not isinstance(data, Mapping):
            raise SimConfigError(f"spec: expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"defaults", "servers"})
        if unknown:
            raise SimConfigError(f"spec: unknown field(s) {', '.join(unknown)}")
        defaults = data.get("defaults", {})
        servers = data.get("servers")
        if not isinstance(defaults, Mapping):
            raise SimConfigError("spec.defaults: expected an object")
        if not isinstance(servers, list) or not servers:
            raise SimConfigError("spec.servers: expected a non-empty list")
        configs = []
        for i, entry in enumerate(servers):
            where = f"servers[{i}]"
            if not isinstance(entry, Mapping):
                raise SimConfigError(f"{where}: expected an object")
            merged = {**defaults, **entry}
            merged.setdefault("name", f"sim-{i + 1}")
            if "models" in merged:
                merged["models"] = _models_shorthand(merged["models"], where)
            configs.append(SimConfig.from_dict(merged, where=where))
        return cls(configs)

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterSpec:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SimConfigError(f"spec file {str(path)!r}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise SimConfigError(f"spec file {str(path)!r}: not valid JSON: {exc}") from None
        return cls.from_dict(data)


def seed_spec(*, speed: float = 1.0, api: str = "lmstudio", servers: int = 2, memory_gb: float = 128,
              models: int = 6, model_gb: float = 15, parallel: tuple[int, ...] | list[int] = (1, 4),
              preload: list[str] | str | None = None, port_base: int = 0, **common: Any) -> ClusterSpec:
    """The seed's cluster; every argument is also an `aibot sim` flag. `common` sets other SimConfig fields
    on every server (e.g. `jit=False`, `faults=FaultConfig(...)`)."""
    if servers < 1:
        raise SimConfigError(f"servers: {servers!r} must be >= 1")
    if not parallel:
        raise SimConfigError("parallel: give at least one value")
    configs = []
    for i in range(servers):
        name = SEED_SERVERS[i] if servers <= len(SEED_SERVERS) else f"mac-studio-{i + 1}"
        p = int(parallel[i % len(parallel)])
        configs.append(SimConfig(
            name=name, api=api, speed=speed, memory_bytes=int(memory_gb * 10**9),
            models=uniform_catalog(models, model_gb, parallel=p), parallel=p,
            preloaded=list(preload) if isinstance(preload, list) else (preload or []),
            port=port_base + i if port_base else 0, **common))
    return ClusterSpec(configs)


class SimCluster:
    """Started servers by name; a context manager that stops them all."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.servers: list[SimServer] = [SimServer(c) for c in spec.servers]

    def start(self) -> SimCluster:
        started = []
        try:
            for s in self.servers:
                started.append(s.start())
        except BaseException:
            for s in started:
                s.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, name: str) -> SimServer:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(f"no simulated server named {name!r} ({', '.join(s.name for s in self.servers)})")

    def __iter__(self) -> Iterator[SimServer]:
        return iter(self.servers)

    @property
    def urls(self) -> dict[str, str]:
        return {s.name: s.url for s in self.servers}

    def stats(self) -> dict[str, dict[str, Any]]:
        return {s.name: s.stats() for s in self.servers}


def start_cluster(spec: ClusterSpec | None = None, **seed_kwargs: Any) -> SimCluster:
    """Starts `spec`, or the seed's shape built from `seed_kwargs` (e.g. `speed=0.01`)."""
    return SimCluster(spec or seed_spec(**seed_kwargs)).start()
