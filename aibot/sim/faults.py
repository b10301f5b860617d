"""Fault injection: which request gets which failure, decided by a seeded RNG so test runs repeat.

At most one fault per request. Rates are probabilities from one uniform draw, so they add up: with
`error_rate=0.1, html_rate=0.1` about 20 % of requests fail. `script` forces the next requests' faults in
order (e.g. `["error", "html"]`), which is what tests usually want; a scripted entry of `"none"` lets one
request through.

Outages are not drawn here: the server opens and closes its socket (see `SimServer.begin_outage`).
Times in faults (`slow_seconds`, outage durations) are wall-clock seconds, not scaled by `speed`,
because they are compared with a client's real timeouts.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Order matters: it is the order of the ranges on the unit interval.
KINDS = ("error", "html", "malformed", "empty_choices", "truncated", "slow")
OUTAGE_MODES = ("refuse", "503")


class FaultConfigError(ValueError):
    pass


@dataclass
class FaultConfig:
    error_rate: float = 0.0          # HTTP 500/503 with a JSON error body
    html_rate: float = 0.0           # HTTP 502 with a text/html page, like a reverse proxy
    malformed_rate: float = 0.0      # HTTP 200 with a body that is not valid JSON
    empty_choices_rate: float = 0.0  # HTTP 200 with "choices": [] (Ollama: empty content)
    truncated_rate: float = 0.0      # the body/stream stops half way and the connection closes
    slow_rate: float = 0.0           # the reply is delayed by slow_seconds while holding the slot
    slow_seconds: float = 30.0
    scope: str = "chat"              # "chat": only generation endpoints; "all": every API endpoint
    outage_mode: str = "refuse"      # "refuse": close the listening socket; "503": answer 503
    outage_windows: list[tuple[float, float]] = field(default_factory=list)  # (start after start(), seconds)
    script: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for f in ("error_rate", "html_rate", "malformed_rate", "empty_choices_rate", "truncated_rate", "slow_rate"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise FaultConfigError(f"faults.{f}: {v!r} must be a number between 0 and 1")
        if self.total_rate() > 1.0 + 1e-9:
            raise FaultConfigError(f"faults: the rates add up to {self.total_rate():.3f}, more than 1")
        if not isinstance(self.slow_seconds, (int, float)) or self.slow_seconds < 0:
            raise FaultConfigError(f"faults.slow_seconds: {self.slow_seconds!r} must be >= 0")
        if self.scope not in ("chat", "all"):
            raise FaultConfigError(f"faults.scope: {self.scope!r} must be 'chat' or 'all'")
        if self.outage_mode not in OUTAGE_MODES:
            raise FaultConfigError(f"faults.outage_mode: {self.outage_mode!r} must be one of {OUTAGE_MODES}")
        windows = []
        for i, w in enumerate(self.outage_windows):
            if not isinstance(w, (list, tuple)) or len(w) != 2 or any(not isinstance(x, (int, float)) or x < 0 for x in w):
                raise FaultConfigError(f"faults.outage_windows[{i}]: {w!r} must be [start_seconds, duration_seconds]")
            windows.append((float(w[0]), float(w[1])))
        self.outage_windows = windows
        for i, k in enumerate(self.script):
            if k not in KINDS and k != "none":
                raise FaultConfigError(f"faults.script[{i}]: {k!r} must be one of {KINDS + ('none',)}")

    def total_rate(self) -> float:
        return sum(getattr(self, f"{k}_rate") for k in KINDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, base: FaultConfig | None = None) -> FaultConfig:
        """`base` lets `POST /_sim/faults` change only the fields it names."""
        if data is None:
            return base or cls()
        if not isinstance(data, Mapping):
            raise FaultConfigError(f"faults: expected an object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FaultConfigError(f"faults: unknown field(s) {', '.join(unknown)}")
        merged = {**(base.to_dict() if base else {}), **data}
        return cls(**merged)


def choose_fault(config: FaultConfig, draw: float) -> str | None:
    """Maps one uniform draw in [0, 1) to a fault kind (pure; the ranges follow KINDS)."""
    edge = 0.0
    for kind in KINDS:
        edge += getattr(config, f"{kind}_rate")
        if draw < edge:
            return kind
    return None


class FaultSchedule:
    """Thread-safe source of per-request faults, with counts of what was injected."""

    def __init__(self, config: FaultConfig, seed: int = 0):
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)
        self.config = config
        self._script: deque[str] = deque(config.script)
        self.injected: Counter[str] = Counter()

    def update(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._script = deque(config.script)

    def draw(self, *, chat: bool) -> str | None:
        with self._lock:
            if not chat and self.config.scope != "all":
                return None
            if self._script:
                kind = self._script.popleft()
                self.config.script = list(self._script)
                kind = None if kind == "none" else kind
            else:
                kind = choose_fault(self.config, self._rng.random())
            if kind is not None and not chat and kind in ("malformed", "empty_choices", "truncated"):
                kind = "error"   # body-shape faults only make sense for completions
            if kind:
                self.injected[kind] += 1
            return kind

    def count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def reset_counts(self) -> None:
        with self._lock:
            self.injected.clear()
            self._rng = random.Random(self._seed)
