"""The simulated inference machine behind every API flavour: memory, loads, slots, generation timing.

Kept apart from HTTP so the accounting can be reasoned about (and unit-tested) on its own. One condition
variable guards all state; the only waits are for a slot, for someone else's load, and the simulated
load/generation time itself (interruptible by `stop_event`, so a server stops promptly).

Counters per model (what other tests assert on): `in_flight` (generating now), `peak_in_flight`, `queued`
(waiting for a slot), `peak_queued`, `served` (completed generations), `failed`, `load_requests` (API loads
plus chat requests that found the model not loaded), `loads` (instances that finished loading),
`load_failures` (refused for memory), `unloads`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aibot.sim.catalog import GB, ModelSpec
from aibot.sim.config import SimConfig

# --------------------------------------------------------------------------------------------- pure parts


def load_seconds(size_bytes: int, seconds_per_gb: float, overhead_seconds: float, speed: float) -> float:
    """Cold-load time grows linearly with the bytes read from disk."""
    return (size_bytes / GB * seconds_per_gb + overhead_seconds) * speed


def batch_multiplier(k: int, alpha: float, curve: list[float] | None = None) -> float:
    """Per-token slowdown with k requests batched on one instance (continuous batching).

    Throughput grows with k while each request slows down a little: 1 + alpha*(k-1) by default; an explicit
    measured `curve` (multipliers for k = 1, 2, ...) wins, extended linearly past its end.
    """
    k = max(1, k)
    if curve:
        if k <= len(curve):
            return curve[k - 1]
        step = curve[-1] - curve[-2] if len(curve) > 1 else 0.0
        return curve[-1] + step * (k - len(curve))
    return 1.0 + alpha * (k - 1)


def tokens_per_step(token_seconds: float, step_seconds: float, remaining: int) -> int:
    """Batches tokens into sleeps of at least `step_seconds`, because sub-millisecond sleeps are all overhead."""
    if remaining <= 0:
        return 0
    if token_seconds <= 0:
        return remaining
    return max(1, min(remaining, math.ceil(step_seconds / token_seconds)))


def fits(used_bytes: int, size_bytes: int, budget_bytes: int | None) -> bool:
    return budget_bytes is None or used_bytes + size_bytes <= budget_bytes


def lmstudio_refusal_message(size_bytes: int, used_bytes: int, budget_bytes: int) -> str:
    """LM Studio's guardrail text; the original bot matched "insufficient system resources",
    "overload your system" and "requires approximately", so all three appear."""
    available = max(0, budget_bytes - used_bytes)
    return ("Failed to load model. Error: Model loading was stopped due to insufficient system resources. "
            f"This model requires approximately {size_bytes / GB:.2f} GB of memory, but only "
            f"{available / GB:.2f} GB is available. Continuing to load the model may overload your system and "
            "cause it to freeze. If you believe this is a mistake, you can try to change the model loading "
            "guardrails in the settings.")


# --------------------------------------------------------------------------------------------- errors


class EngineError(Exception):
    pass


class UnknownModel(EngineError):
    def __init__(self, key: str):
        super().__init__(f"model {key!r} is not in the catalogue")
        self.key = key


class NotLoaded(EngineError):
    def __init__(self, key: str, loaded: list[str]):
        super().__init__(f"model {key!r} is not loaded")
        self.key = key
        self.loaded = loaded


class InsufficientMemory(EngineError):
    def __init__(self, key: str, size: int, used: int, budget: int):
        super().__init__(lmstudio_refusal_message(size, used, budget))
        self.key, self.size, self.used, self.budget = key, size, used, budget


class NoSuchInstance(EngineError):
    def __init__(self, instance_id: str):
        super().__init__(f"no loaded instance {instance_id!r}")
        self.instance_id = instance_id


class BadLoadRequest(EngineError):
    """A load parameter is out of range; the message names it."""


class Stopped(EngineError):
    pass


class Unloaded(Stopped):
    """The instance a request was generating on was unloaded underneath it (`Engine.cut_on_unload`)."""


# --------------------------------------------------------------------------------------------- state


@dataclass
class Instance:
    id: str
    spec: ModelSpec
    parallel: int
    context_length: int
    state: str = "loading"               # loading | loaded | unloaded
    active: set[int] = field(default_factory=set)   # busy slot indices
    waiting: deque[object] = field(default_factory=deque)
    loaded_at: float | None = None
    last_used: float = field(default_factory=time.time)
    expires_at: float | None = None      # Ollama keep_alive; None = never
    load_seconds: float = 0.0
    jit: bool = False                    # loaded by a chat request (acquire with jit=True), not by an API load

    @property
    def key(self) -> str:
        return self.spec.key

    def load(self) -> int:
        return len(self.active) + len(self.waiting)


@dataclass
class ModelCounters:
    in_flight: int = 0
    peak_in_flight: int = 0
    queued: int = 0
    peak_queued: int = 0
    served: int = 0
    failed: int = 0
    load_requests: int = 0
    loads: int = 0
    load_failures: int = 0
    unloads: int = 0

    def reset(self) -> None:
        live_in_flight, live_queued = self.in_flight, self.queued
        self.__init__()  # type: ignore[misc]
        self.in_flight = self.peak_in_flight = live_in_flight
        self.queued = self.peak_queued = live_queued


@dataclass(frozen=True)
class InstanceInfo:
    """A consistent copy of one instance for listing endpoints."""
    id: str
    key: str
    spec: ModelSpec
    state: str
    parallel: int
    context_length: int
    busy_slots: frozenset[int]
    queued: int
    expires_at: float | None
    last_used: float
    jit: bool = False


class Engine:
    def __init__(self, config: SimConfig, *, stop_event: threading.Event | None = None, evict_lru: bool = False):
        self.config = config
        self.catalog = config.catalog
        self.stop_event = stop_event or threading.Event()
        self.evict_lru = evict_lru
        self.lock = threading.Condition()
        self._instances: dict[str, Instance] = {}
        self._counters = {k: ModelCounters() for k in self.catalog}
        self._server_active = 0
        self._server_peak = 0
        self._memory_peak = 0
        self._refusals = 0
        self._evictions = 0
        # Flavour policies (set by the flavour before the server starts; the defaults change nothing):
        self.instance_name: Callable[[ModelSpec], str] = lambda spec: spec.key   # instance ids: name, name:2, ...
        self.jit_keep_last = False    # a JIT load first unloads the other models' JIT-loaded instances
        self.cut_on_unload = False    # unloading an instance cuts the requests generating on it

    # ------------------------------------------------------------------ helpers (call with lock held)

    def spec(self, key: str) -> ModelSpec:
        spec = self.catalog.get(key)
        if spec is None:
            raise UnknownModel(key)
        return spec

    def _used(self) -> int:
        models = sum(i.spec.size_bytes for i in self._instances.values())
        return models + self._server_active * self.config.per_request_bytes

    def _note_memory(self) -> None:
        self._memory_peak = max(self._memory_peak, self._used())

    def _new_id(self, key: str) -> str:
        if key not in self._instances:
            return key
        n = 2
        while f"{key}:{n}" in self._instances:
            n += 1
        return f"{key}:{n}"

    def _loaded_of(self, key: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.key == key and i.state == "loaded"]

    def _loading_of(self, key: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.key == key and i.state == "loading"]

    def _model_active(self, key: str) -> int:
        return sum(len(i.active) for i in self._instances.values() if i.key == key)

    def _check_stopped(self) -> None:
        if self.stop_event.is_set():
            raise Stopped("simulator stopping")

    def _reserve(self, spec: ModelSpec, context_length: int | None) -> Instance:
        """Reserves memory for a new instance (state 'loading') or raises InsufficientMemory."""
        budget = self.config.memory_bytes
        if not fits(self._used(), spec.size_bytes, budget) and self.evict_lru:
            self._evict_for(spec.size_bytes)
        if not fits(self._used(), spec.size_bytes, budget):
            self._counters[spec.key].load_failures += 1
            self._refusals += 1
            raise InsufficientMemory(spec.key, spec.size_bytes, self._used(), budget or 0)
        ctx = spec.context_length if context_length is None else context_length
        inst = Instance(id=self._new_id(self.instance_name(spec)), spec=spec, parallel=self.config.parallel_for(spec),
                        context_length=ctx)
        inst.load_seconds = load_seconds(spec.size_bytes, self.config.seconds_per_gb,
                                         self.config.load_overhead_seconds, self.config.speed)
        self._instances[inst.id] = inst
        self._note_memory()
        return inst

    def _evict_for(self, size: int) -> None:
        """Ollama's policy: unload idle models, least recently used first, until `size` fits."""
        idle = sorted((i for i in self._instances.values() if i.state == "loaded" and not i.active and not i.waiting),
                      key=lambda i: i.last_used)
        if not fits(self._used() - sum(i.spec.size_bytes for i in idle), size, self.config.memory_bytes):
            return   # it would not fit even with every idle model gone: evict nothing
        for inst in idle:
            if fits(self._used(), size, self.config.memory_bytes):
                return
            self._drop(inst)
            self._evictions += 1

    def _evict_other_jit(self, key: str) -> None:
        """Keep-last JIT policy: unload the loaded JIT instances of every other model, busy or not."""
        for inst in [i for i in self._instances.values() if i.jit and i.key != key and i.state == "loaded"]:
            self._drop(inst)
            self._evictions += 1

    def _drop(self, inst: Instance) -> None:
        inst.state = "unloaded"
        self._instances.pop(inst.id, None)
        self._counters[inst.key].unloads += 1
        self.lock.notify_all()

    def _finish_load(self, inst: Instance, ok: bool) -> None:
        if ok and inst.id in self._instances:
            inst.state = "loaded"
            inst.loaded_at = inst.last_used = time.time()
            self._counters[inst.key].loads += 1
        else:
            inst.state = "unloaded"
            self._instances.pop(inst.id, None)
        self.lock.notify_all()

    def _wait_load(self, inst: Instance) -> None:
        """Sleeps the load time without the lock; the instance is visible as 'loading' meanwhile."""
        ok = False
        try:
            if self.stop_event.wait(inst.load_seconds):
                raise Stopped("simulator stopping")
            ok = True
        finally:
            with self.lock:
                self._finish_load(inst, ok)

    # ------------------------------------------------------------------ loading

    def load(self, key: str, *, context_length: int | None = None, instant: bool = False,
             reuse_loaded: bool | None = None) -> Instance:
        """Loads an instance, blocking for the load time. Counts as a load request.

        `reuse_loaded` (default: not `config.load_duplicates`) returns an existing loaded instance instead of
        adding another, and waits for an in-progress load of the same model.
        """
        reuse = (not self.config.load_duplicates) if reuse_loaded is None else reuse_loaded
        with self.lock:
            self._check_stopped()
            spec = self.spec(key)
            if context_length is not None and (not isinstance(context_length, int)
                                               or not 1 <= context_length <= spec.max_context_length):
                raise BadLoadRequest(f"context_length: {context_length!r} must be an integer between 1 and "
                                     f"{spec.max_context_length} for {key!r}")
            self._counters[key].load_requests += 1
            while reuse:
                loaded = self._loaded_of(key)
                if loaded:
                    return loaded[0]
                if not self._loading_of(key):
                    break
                self.lock.wait(0.5)
                self._check_stopped()
            inst = self._reserve(spec, context_length)
            if instant:
                inst.load_seconds = 0.0
                self._finish_load(inst, True)
                return inst
        self._wait_load(inst)
        if inst.state != "loaded":
            raise Stopped("load interrupted")
        return inst

    def start_load(self, key: str, *, context_length: int | None = None) -> Instance:
        """Begins a load in a background thread (llama.cpp router style) and returns the 'loading' instance;
        a model already loaded or loading is returned as is."""
        with self.lock:
            self._check_stopped()
            spec = self.spec(key)
            self._counters[key].load_requests += 1
            existing = self._loaded_of(key) or self._loading_of(key)
            if existing:
                return existing[0]
            inst = self._reserve(spec, context_length)
        threading.Thread(target=self._quiet_wait_load, args=(inst,), daemon=True,
                         name=f"sim-load-{key}").start()
        return inst

    def _quiet_wait_load(self, inst: Instance) -> None:
        try:
            self._wait_load(inst)
        except Stopped:
            pass

    def unload(self, instance_id: str) -> Instance:
        with self.lock:
            inst = self._instances.get(instance_id)
            if inst is None or inst.state != "loaded":
                raise NoSuchInstance(instance_id)
            self._drop(inst)
            return inst

    def unload_model(self, key: str) -> int:
        """Unloads every loaded instance of `key`; returns how many."""
        with self.lock:
            self.spec(key)
            found = self._loaded_of(key)
            for inst in found:
                self._drop(inst)
            return len(found)

    def unload_all(self) -> int:
        with self.lock:
            found = [i for i in self._instances.values() if i.state == "loaded"]
            for inst in found:
                self._drop(inst)
            return len(found)

    def set_expiry(self, inst_id: str, expires_at: float | None) -> None:
        with self.lock:
            inst = self._instances.get(inst_id)
            if inst is not None:
                inst.expires_at = expires_at

    def expire_idle(self, now: float | None = None) -> int:
        """Unloads idle instances whose keep-alive has passed (Ollama); called lazily by the API layer."""
        now = time.time() if now is None else now
        with self.lock:
            gone = [i for i in self._instances.values() if i.state == "loaded" and i.expires_at is not None
                    and i.expires_at <= now and not i.active and not i.waiting]
            for inst in gone:
                self._drop(inst)
            return len(gone)

    # ------------------------------------------------------------------ generation slots

    def acquire(self, key: str, *, jit: bool) -> Lease:
        """Waits for a free slot on a loaded instance of `key` (FIFO per instance), JIT-loading if allowed."""
        counted_load_request = False
        while True:
            with self.lock:
                self._check_stopped()
                spec = self.spec(key)
                counters = self._counters[key]
                loaded = self._loaded_of(key)
                to_load = None
                if not loaded:
                    if not jit:
                        raise NotLoaded(key, sorted({i.key for i in self._instances.values() if i.state == "loaded"}))
                    if not counted_load_request:
                        counters.load_requests += 1
                        counted_load_request = True
                    if self._loading_of(key) and not self.config.jit_race:
                        self.lock.wait(0.5)
                        continue
                    if self.jit_keep_last:
                        self._evict_other_jit(key)
                    to_load = self._reserve(spec, None)
                    to_load.jit = True
            if to_load is not None:
                self._wait_load(to_load)
                continue
            with self.lock:
                candidates = self._loaded_of(key)
                if not candidates:
                    continue      # unloaded between our two lock holds: start over
                inst = min(candidates, key=Instance.load)   # least busy instance (duplicates share work)
                ticket = object()
                inst.waiting.append(ticket)
                counters.queued += 1
                counters.peak_queued = max(counters.peak_queued, counters.queued)
                try:
                    while True:
                        self._check_stopped()
                        if inst.state != "loaded":
                            break
                        server_ok = (self.config.server_parallel is None
                                     or self._server_active < self.config.server_parallel)
                        if inst.waiting[0] is ticket and len(inst.active) < inst.parallel and server_ok:
                            break
                        self.lock.wait(0.5)
                finally:
                    inst.waiting.remove(ticket)
                    counters.queued -= 1
                    self.lock.notify_all()
                if inst.state != "loaded":
                    continue      # unloaded while we waited: find another instance or load again
                slot = min(set(range(inst.parallel)) - inst.active)
                inst.active.add(slot)
                inst.last_used = time.time()
                counters.in_flight += 1
                counters.peak_in_flight = max(counters.peak_in_flight, self._model_active(key))
                self._server_active += 1
                self._server_peak = max(self._server_peak, self._server_active)
                self._note_memory()
                return Lease(self, inst, slot)

    def _release(self, lease: Lease, ok: bool) -> None:
        with self.lock:
            inst = lease.instance
            inst.active.discard(lease.slot)
            inst.last_used = time.time()
            c = self._counters[inst.key]
            c.in_flight -= 1
            if ok:
                c.served += 1
            else:
                c.failed += 1
            self._server_active -= 1
            self.lock.notify_all()

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.stop_event.wait(seconds):
            raise Stopped("simulator stopping")

    # ------------------------------------------------------------------ views

    def single_model(self) -> str:
        """The model a single-model server (llama-server) serves: the first preloaded, else the first listed."""
        return (self.config.preloaded or list(self.catalog))[0]

    def instances(self) -> list[InstanceInfo]:
        with self.lock:
            return [InstanceInfo(i.id, i.key, i.spec, i.state, i.parallel, i.context_length, frozenset(i.active),
                                 len(i.waiting), i.expires_at, i.last_used, i.jit)
                    for i in self._instances.values()]

    def is_loaded(self, key: str) -> bool:
        with self.lock:
            return bool(self._loaded_of(key))

    def stats(self) -> dict[str, Any]:
        with self.lock:
            models = {}
            for key, c in self._counters.items():
                d = dict(vars(c))
                d["loaded_instances"] = len(self._loaded_of(key))
                d["loading_instances"] = len(self._loading_of(key))
                models[key] = d
            return {
                "models": models,
                "memory": {"budget_bytes": self.config.memory_bytes, "used_bytes": self._used(),
                           "peak_bytes": self._memory_peak, "refusals": self._refusals,
                           "evictions": self._evictions},
                "server": {"in_flight": self._server_active, "peak_in_flight": self._server_peak},
            }

    def reset_stats(self) -> None:
        with self.lock:
            for c in self._counters.values():
                c.reset()
            self._server_peak = self._server_active
            self._memory_peak = self._used()
            self._refusals = 0
            self._evictions = 0


class Lease:
    """One generating request holding one slot of one instance; `generate` paces the tokens."""

    def __init__(self, engine: Engine, instance: Instance, slot: int):
        self.engine = engine
        self.instance = instance
        self.slot = slot
        self._released = False
        self.started = time.monotonic()

    def generate(self, n_tokens: int, prompt_tokens: int = 0, extra_delay: float = 0.0) -> Iterator[int]:
        """Yields how many tokens were produced at each step, sleeping as a batched server would.

        The batch size k is re-read every step, so requests that join or leave the batch speed up or slow
        down the others, as with continuous batching.
        """
        cfg = self.engine.config
        self.engine.sleep(extra_delay)
        self.engine.sleep((cfg.ttft_seconds + prompt_tokens * cfg.prompt_token_seconds) * cfg.speed)
        remaining = n_tokens
        while remaining > 0:
            k = len(self.instance.active)
            token_s = cfg.per_token_seconds * cfg.speed * batch_multiplier(k, cfg.batch_alpha, cfg.batch_curve)
            n = tokens_per_step(token_s, cfg.step_seconds, remaining)
            self.engine.sleep(n * token_s)
            if self.engine.cut_on_unload and self.instance.state == "unloaded":
                raise Unloaded(f"instance {self.instance.id!r} was unloaded while generating")
            remaining -= n
            yield n

    def release(self, ok: bool = True) -> None:
        if not self._released:
            self._released = True
            self.engine._release(self, ok)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(ok=exc_type is None)
