"""How many requests a server may have in flight: the seed's "robust equation", as pure functions.

    slots = min(Σ parallel of loaded models,
                floor((RAM − system reserve − Σ model sizes − safety) / per-request buffer),
                hard cap)

Why each term: a loaded model serves at most `parallel` predictions at once (more only queue inside
the server), every in-flight request needs a working buffer (KV cache, activations; the seed's 3 GB),
the OS and the server need their reserve, and a safety margin absorbs estimates that are off. The
hard cap is the seed's "HTTP server practical limit".

Safety is `safety_fraction × (RAM − system reserve)`, not a fraction of the whole RAM: that is the only
reading that reproduces the seed's own arithmetic ("Safety: 12GB" for 128 GB with an 8 GB reserve,
giving (128 − 8 − 90 − 12) / 3 = 6 slots for six 15 GB f16 models). 10 % of the whole RAM (12.8 GB)
would give floor(17.2 / 3) = 5 and contradict the seed's table.

All quantities are integer bytes (GB = 10⁹, as in the schema defaults) and the safety margin is
rounded up, so `accounted_bytes(...) <= RAM` holds exactly, without float slop.

The one statement of the memory accounting, safety margin included: the `server_health` view
accounts the margin the refresh stores from `Budget.safety_bytes`. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

GB = 1_000_000_000

DEFAULT_SYSTEM_RESERVE = 8 * GB
DEFAULT_SAFETY_FRACTION = 0.10
DEFAULT_PER_REQUEST = 3 * GB
DEFAULT_HARD_CAP = 12

# States whose memory is resident. Only `loaded` instances can serve requests (get slots); a model
# that is still loading or being unloaded occupies its memory all the same.
RESIDENT_STATES = frozenset({"loaded", "loading", "unloading"})


class SizingError(ValueError):
    """Bad sizing input; the message names the field and value."""


class OvercommitError(ValueError):
    """A requested worker/slot count does not fit the memory budget; the message shows the arithmetic."""

    def __init__(self, message: str, *, max_workers: int):
        super().__init__(message)
        self.max_workers = max_workers


@dataclass(frozen=True)
class Budget:
    """One server's memory budget and sizing knobs (the `servers` table columns)."""

    memory_bytes: int | None          # RAM; None = unknown (no memory bound can be computed)
    system_reserve_bytes: int = DEFAULT_SYSTEM_RESERVE
    safety_fraction: float = DEFAULT_SAFETY_FRACTION
    per_request_bytes: int = DEFAULT_PER_REQUEST
    hard_cap: int = DEFAULT_HARD_CAP

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int) or self.memory_bytes < 0):
            raise SizingError(f"memory_bytes must be a non-negative integer or None, got {self.memory_bytes!r}")
        if not isinstance(self.system_reserve_bytes, int) or self.system_reserve_bytes < 0:
            raise SizingError(f"system_reserve_bytes must be a non-negative integer, got {self.system_reserve_bytes!r}")
        if not (0.0 <= float(self.safety_fraction) < 1.0) or math.isnan(float(self.safety_fraction)):
            raise SizingError(f"safety_fraction must be in [0, 1), got {self.safety_fraction!r}")
        if not isinstance(self.per_request_bytes, int) or self.per_request_bytes <= 0:
            raise SizingError(f"per_request_bytes must be a positive integer, got {self.per_request_bytes!r}")
        if not isinstance(self.hard_cap, int) or self.hard_cap < 0:
            raise SizingError(f"hard_cap must be a non-negative integer, got {self.hard_cap!r}")

    @property
    def safety_bytes(self) -> int:
        """The safety margin: a fraction of what is left after the system reserve (rounded up)."""
        if self.memory_bytes is None:
            return 0
        return math.ceil(self.safety_fraction * max(0, self.memory_bytes - self.system_reserve_bytes))

    @classmethod
    def from_row(cls, row: dict, memory_bytes: int | None = None) -> Budget:
        """A budget from a `servers` row (column names match the fields)."""
        return cls(
            memory_bytes=row.get("memory_bytes") if memory_bytes is None else memory_bytes,
            system_reserve_bytes=int(row.get("system_reserve_bytes", DEFAULT_SYSTEM_RESERVE)),
            safety_fraction=float(row.get("safety_fraction", DEFAULT_SAFETY_FRACTION)),
            per_request_bytes=int(row.get("per_request_bytes", DEFAULT_PER_REQUEST)),
            hard_cap=int(row.get("hard_cap", DEFAULT_HARD_CAP)),
        )


@dataclass(frozen=True)
class Instance:
    """A model resident on a server, as far as sizing cares."""

    model: str
    size_bytes: int
    parallel: int = 1
    state: str = "loaded"

    def __post_init__(self) -> None:
        if not isinstance(self.size_bytes, int) or self.size_bytes < 0:
            raise SizingError(f"size_bytes of model {self.model!r} must be a non-negative integer, got {self.size_bytes!r}")
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise SizingError(f"parallel of model {self.model!r} must be an integer >= 1, got {self.parallel!r}")
        if self.state not in RESIDENT_STATES:
            raise SizingError(f"state of model {self.model!r} must be one of {sorted(RESIDENT_STATES)}, got {self.state!r}")


@dataclass(frozen=True)
class SizingResult:
    slots: int                    # requests the server may have in flight
    parallel_total: int           # Σ parallel of loaded (servable) models
    memory_bound: int | None      # floor(free / per-request), None when RAM is unknown
    hard_cap: int
    limited_by: str               # "parallel" | "memory" | "hard_cap" | "no models"
    models_bytes: int             # Σ sizes of resident models (loading/unloading included)
    reserve_bytes: int
    safety_bytes: int
    free_bytes: int | None        # RAM − reserve − models − safety (may be negative), None if unknown
    per_request_bytes: int = DEFAULT_PER_REQUEST

    @property
    def overcommitted(self) -> bool:
        """True when the resident models alone already exceed what the budget allows."""
        return self.free_bytes is not None and self.free_bytes < 0


def _count(instances: Iterable[Instance]) -> tuple[int, int]:
    models_bytes = 0
    parallel_total = 0
    for inst in instances:
        models_bytes += inst.size_bytes
        if inst.state == "loaded":
            parallel_total += inst.parallel
    return models_bytes, parallel_total


def free_bytes(budget: Budget, models_bytes: int) -> int | None:
    """Memory left for request buffers once models, reserve and safety are accounted (None = unknown)."""
    if budget.memory_bytes is None:
        return None
    return budget.memory_bytes - budget.system_reserve_bytes - models_bytes - budget.safety_bytes


def memory_bound(budget: Budget, models_bytes: int) -> int | None:
    """How many request buffers fit next to `models_bytes` of models (never negative)."""
    free = free_bytes(budget, models_bytes)
    if free is None:
        return None
    return max(0, free // budget.per_request_bytes)


def server_slots(budget: Budget, instances: Iterable[Instance]) -> SizingResult:
    """The seed's formula for one server. Unknown RAM leaves only the parallel and hard-cap bounds."""
    instances = list(instances)
    models_bytes, parallel_total = _count(instances)
    bound = memory_bound(budget, models_bytes)
    candidates = [("parallel", parallel_total), ("hard_cap", budget.hard_cap)]
    if bound is not None:
        candidates.insert(1, ("memory", bound))
    limited_by, slots = min(candidates, key=lambda c: c[1])   # ties: parallel, then memory, then cap
    if parallel_total == 0:
        limited_by = "no models"
    return SizingResult(
        slots=slots,
        parallel_total=parallel_total,
        memory_bound=bound,
        hard_cap=budget.hard_cap,
        limited_by=limited_by,
        models_bytes=models_bytes,
        reserve_bytes=budget.system_reserve_bytes,
        safety_bytes=budget.safety_bytes,
        free_bytes=free_bytes(budget, models_bytes),
        per_request_bytes=budget.per_request_bytes,
    )


def accounted_bytes(budget: Budget, instances: Iterable[Instance], slots: int) -> int:
    """Memory the server is accounted for with `slots` requests in flight: the left side of `<= RAM`."""
    models_bytes, _ = _count(instances)
    return models_bytes + slots * budget.per_request_bytes + budget.system_reserve_bytes + budget.safety_bytes


def fits(budget: Budget, instances: Iterable[Instance], slots: int) -> bool:
    """Whether `slots` in-flight requests next to these models stay within RAM (unknown RAM: True)."""
    if budget.memory_bytes is None:
        return True
    return accounted_bytes(budget, instances, slots) <= budget.memory_bytes


def gb(n: int | float | None) -> str:
    """Bytes as the seed writes them ("90GB", "12.8GB")."""
    if n is None:
        return "?"
    value = n / GB
    if abs(value) < 1 and value != 0:
        return f"{value:.2f}GB"
    return f"{value:.0f}GB" if abs(value - round(value)) < 0.05 else f"{value:.1f}GB"


def explain(budget: Budget, instances: Iterable[Instance], workers: int) -> str:
    """The seed-style memory arithmetic for `workers` requests in flight."""
    instances = list(instances)
    models_bytes, _ = _count(instances)
    total = accounted_bytes(budget, instances, workers)
    return (f"models {gb(models_bytes)} ({len(instances)} loaded) + {workers} requests × "
            f"{gb(budget.per_request_bytes)} = {gb(workers * budget.per_request_bytes)} + system "
            f"{gb(budget.system_reserve_bytes)} + safety {gb(budget.safety_bytes)} = {gb(total)} "
            f"of {gb(budget.memory_bytes)} RAM")


def check_workers(budget: Budget, instances: Iterable[Instance], workers: int) -> int:
    """Accepts a requested worker (in-flight request) count only if it fits the memory budget.

    The seed's Scenario B (20 workers next to six 15 GB models on 128 GB) must be refused loudly rather
    than swap the machine to death; the error carries the arithmetic and the largest count that fits.
    Returns `workers` when it fits.
    """
    if not isinstance(workers, int) or workers < 0:
        raise SizingError(f"workers must be a non-negative integer, got {workers!r}")
    instances = list(instances)
    if fits(budget, instances, workers):
        return workers
    models_bytes, _ = _count(instances)
    most = memory_bound(budget, models_bytes) or 0
    raise OvercommitError(
        f"{workers} workers overcommit memory: {explain(budget, instances, workers)}; "
        f"at most {most} fit ({explain(budget, instances, most)})",
        max_workers=most,
    )


def choose_memory(reported: int | None, configured: int | None,
                  host_total: int | None = None) -> tuple[int | None, str | None]:
    """The RAM to size a server by, and where it came from.

    The server's own report wins (it knows its hardware); then config (`capabilities.maxMemory`, the
    operator's statement of the budget); then, for a server on this very host, psutil's total RAM.
    """
    for value, source in ((reported, "server"), (configured, "config"), (host_total, "host")):
        if value:
            return int(value), source
    return None, None


def worker_command(total_slots: int, processes: int) -> tuple[int, int, str]:
    """Dramatiq processes × threads that can drive `total_slots` generations at once.

    Each in-flight generation occupies one worker thread while it waits on HTTP, so a host needs at
    least as many threads as the slots it should be able to fill: P × T >= total slots.
    """
    if processes < 1:
        raise SizingError(f"processes must be >= 1, got {processes}")
    threads = max(1, math.ceil(max(0, total_slots) / processes))
    return processes, threads, f"dramatiq aibot.actors --processes {processes} --threads {threads}"
