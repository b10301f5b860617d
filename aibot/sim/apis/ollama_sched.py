"""Ollama's scheduler, simulated: which models stay in memory, for how long, and which goes to make room.

A port of ollama/ollama `server/sched.go` @fb30760996871fa9460115c753afd2c60d4ab0f7 (v0.33.0-rc2) on top
of the shared `Engine` (memory, load time, slots); the Ollama flavour calls `runner()` where the real
handlers call `scheduleRunner`/`getRunner`.

- One request is scheduled at a time (`processPending` is a single loop), and a load holds that loop
  for its whole load time (`Scheduler.load` calls `llama.Load`, which waits until the runner is up):
  while one model loads, requests that need the scheduler wait, requests already holding a runner
  go on.
- Keep-alive: each runner has a session duration, the loading request's `keep_alive` or else
  OLLAMA_KEEP_ALIVE (`Scheduler.load`); a later request that sends `keep_alive` replaces it, one that
  does not (every `/v1/...` request) leaves it (`useLoadedRunner`). The runner expires that long after
  its last request finished (`processCompleted`: `expiresAt = now + sessionDuration`), at once for 0.
  Expiry is applied lazily, before each request, which is all a client can observe.
- Room: before a load, if OLLAMA_MAX_LOADED_MODELS runners are loaded (default `defaultModelsPerGPU`
  3 × the GPU count, at least 1: 3 here, the simulator has no GPUs), or the model does not fit next
  to the loaded ones (the pre-flight check in `Scheduler.load`), one runner is unloaded and the check
  repeated (`processPending`). The one chosen (`findRunnerToUnload`, `ByDurationAndName`): shortest
  session duration first, then model path (here the model's digest), the first idle one, else the
  first one, waited for until its requests are done. Alone and still too big, the load fails.
- Reload: a request whose `num_ctx` differs from the loaded runner's replaces the runner
  (`needsReload`); a request without `num_ctx` (all of `/v1`) asks for the default context.

Not simulated: Ollama's 80% headroom on free GPU memory (take `memory_bytes` as the usable memory),
its retry of an out-of-memory load with a smaller automatic context, OLLAMA_MAX_QUEUE.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time

from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig
from aibot.sim.engine import Engine, InstanceInfo, NoSuchInstance, Stopped

#: keep_alive -1 is Go's largest Duration, `time.Duration(math.MaxInt64)` (api/types.go), in seconds.
FOREVER_SECONDS = (2**63 - 1) / 1e9
DEFAULT_MODELS_PER_GPU = 3      # sched.go `defaultModelsPerGPU`
GPUS = 0


def digest(key: str) -> str:
    """A stable stand-in for the model's sha256 digest (and blob path, which orders evictions)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Scheduler:
    def __init__(self, engine: Engine, config: SimConfig, default_keep_alive: float):
        self.engine = engine
        self.config = config
        self.default_keep_alive = default_keep_alive
        self.max_loaded = config.ollama_max_loaded_models or DEFAULT_MODELS_PER_GPU * max(GPUS, 1)
        self._lock = threading.Lock()
        self._keep: dict[str, float] = {}    # instance id -> session duration, seconds (inf = forever)

    # ------------------------------------------------------------------ keep-alive

    def keep_alive(self, inst_id: str) -> float:
        """An instance the scheduler did not load (`SimConfig.preloaded`) is pinned."""
        return self._keep.get(inst_id, math.inf)

    def expires_at(self, info: InstanceInfo) -> float:
        """Epoch seconds; `last_used` is when its last request finished (or when it loaded)."""
        keep = self.keep_alive(info.id)
        return info.last_used + (FOREVER_SECONDS if math.isinf(keep) else keep)

    def expire(self) -> None:
        now = time.time()
        infos = self.engine.instances()
        for stale in set(self._keep) - {i.id for i in infos}:
            self._keep.pop(stale, None)
        for info in infos:
            if info.state == "loaded" and not info.busy_slots and not info.queued and self.expires_at(info) <= now:
                self._unload(info.id)

    def expire_model(self, key: str) -> None:
        """`Scheduler.expireRunner`: keep-alive 0, so it goes as soon as its requests are done."""
        for info in self.engine.instances():
            if info.key == key:
                self._keep[info.id] = 0.0
        self.expire()

    # ------------------------------------------------------------------ scheduling

    def runner(self, key: str, *, keep_alive: float | None, num_ctx: int | None) -> None:
        """Makes sure `key` is loaded as the request asks (`getRunner` + `processPending`).

        `keep_alive`: seconds, inf = forever, None = the request did not say. Raises the engine's
        errors (InsufficientMemory when the model does not fit even alone).
        """
        spec = self.engine.spec(key)
        ctx = _effective_context(num_ctx, spec)
        with self._lock:
            self.expire()
            current = self._loaded(key)
            if current is not None and current.context_length != ctx:
                self._evict(current)
                current = None
            if current is not None:
                if keep_alive is not None:
                    self._keep[current.id] = keep_alive
                return
            self._make_room(spec)
            inst = self.engine.load(key, context_length=ctx, reuse_loaded=True)
            self._keep[inst.id] = self.default_keep_alive if keep_alive is None else keep_alive

    def _loaded(self, key: str) -> InstanceInfo | None:
        return next((i for i in self.engine.instances() if i.key == key and i.state == "loaded"), None)

    def _make_room(self, spec: ModelSpec) -> None:
        budget = self.config.memory_bytes
        while True:
            present = [i for i in self.engine.instances() if i.state in ("loaded", "loading")]
            used = self.engine.stats()["memory"]["used_bytes"]
            full = len(present) >= self.max_loaded
            if not full and (budget is None or used + spec.size_bytes <= budget):
                return
            victims = sorted((i for i in present if i.state == "loaded"), key=self._eviction_order)
            if not victims:
                return                       # only loads in flight elsewhere: let the engine decide
            idle = [v for v in victims if not v.busy_slots and not v.queued]
            self._evict((idle or victims)[0])

    def _eviction_order(self, info: InstanceInfo) -> tuple[int, str]:
        keep = self.keep_alive(info.id)
        return (2**63 - 1 if math.isinf(keep) else int(keep * 1e9), digest(info.key))

    def _evict(self, info: InstanceInfo) -> None:
        """Expires `info` now and waits until its requests are done and it is gone."""
        self._keep[info.id] = 0.0
        with self.engine.lock:
            while True:
                cur = next((i for i in self.engine.instances() if i.id == info.id), None)
                if cur is None or cur.state != "loaded":
                    return
                if not cur.busy_slots and not cur.queued:
                    self._unload(cur.id)
                    return
                if self.engine.stop_event.is_set():
                    raise Stopped("simulator stopping")
                self.engine.lock.wait(0.5)

    def _unload(self, inst_id: str) -> None:
        try:
            self.engine.unload(inst_id)
        except NoSuchInstance:
            pass
        self._keep.pop(inst_id, None)


def _effective_context(num_ctx: int | None, spec: ModelSpec) -> int:
    """The request's num_ctx, else the model's default, capped at its trained context
    (`effectiveContext`), and at least 4 (`getRunner`)."""
    ctx = spec.context_length if num_ctx is None else num_ctx
    return max(4, min(ctx, spec.max_context_length))
