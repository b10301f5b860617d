"""The policies people would run instead of aibot, re-implemented as dispatchers against the simulator
(bench/workload.py drives each with the same trace).

Every dispatcher gets `submit(key, model, at)` calls in arrival order and records, per request, when it
reached the server (`dispatched`) and when its reply came back (`done`); HTTP goes to the simulators
(LM Studio REST: `/api/v1/models/load|unload`, `/v1/chat/completions`). Personas are pinned to a server
by a stable hash where the real tool has one server per deployment.

- `Sequential`: the original bot, one worker loop: oldest request first, one generation at a time,
  sent to the persona's server, whose LM Studio JIT (Auto-Evict) loads the model in place of the last one.
- `LmStudioJit`: users' requests straight to LM Studio with JIT loading and Auto-Evict (one JIT model at a
  time) and its default 4 parallel predictions; requests for the resident model run, any other swaps it.
- `Ollama`: Ollama's scheduler per server: one FIFO pending queue, one load at a time, a loaded runner
  takes `OLLAMA_NUM_PARALLEL` (4) requests (more queue inside it), at most `OLLAMA_MAX_LOADED_MODELS` (3)
  runners, and a model that does not fit waits for the least recently used idle runner to be evicted.
- `LlamaSwap`: llama-swap in front of llama-server (--parallel 4) per server: one model at a time, swap on
  demand, FIFO per model (the resident model's queue is served before swapping to the model of the
  oldest waiting request; a swap waits for the requests in flight).
- `LiteLlmLeastBusy`: LiteLLM's least-busy router over fixed deployments (every model on both LM Studio
  servers, JIT + Auto-Evict there): each request goes to the deployment with the fewest requests in flight;
  no load control.
"""

from __future__ import annotations

import collections
import threading
import time
import zlib
from collections.abc import Sequence

from bench import common


def lms_key(model: str) -> str:
    """LM Studio's REST API loads by key (`persona`), not by variant (`persona@f16`)."""
    return model.split("@", 1)[0]


def pinned(model: str, n: int) -> int:
    """A persona's server when each tool runs one deployment per server (stable across runs)."""
    return zlib.crc32(model.encode()) % n


class Dispatcher:
    name = "?"

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.lock = threading.Condition()
        self.dispatched: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.failed: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def submit(self, key: str, model: str) -> None:
        raise NotImplementedError

    def _chat(self, server: int, key: str, model: str, on_done=None) -> None:
        client = common.NaiveClient(self.urls[server])
        try:
            with self.lock:
                self.dispatched.setdefault(key, common.now())
            status = client.chat(model, key)
        finally:
            client.close()
        with self.lock:
            if status == 200:
                self.done[key] = common.now()
            else:
                self.failed[str(status)] += 1
            if on_done:
                on_done()
            self.lock.notify_all()

    def _spawn(self, *args, target=None) -> None:
        t = threading.Thread(target=target or self._chat, args=args, daemon=True)
        t.start()

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
        for t in self.threads:
            t.join(5)


class LmStudioJit(Dispatcher):
    name = "LM Studio JIT (auto-evict, 4 parallel)"

    def submit(self, key: str, model: str) -> None:
        self._spawn(pinned(model, len(self.urls)), key, model)


class LiteLlmLeastBusy(Dispatcher):
    name = "LiteLLM least-busy"

    def __init__(self, urls):
        super().__init__(urls)
        self.inflight = [0] * len(urls)

    def submit(self, key: str, model: str) -> None:
        with self.lock:
            s = min(range(len(self.urls)), key=lambda i: (self.inflight[i], i))
            self.inflight[s] += 1

        def finished(s=s):
            self.inflight[s] -= 1
        self._spawn(s, key, model, finished)


class _Queued(Dispatcher):
    """A dispatcher with its own queue per server and a loop thread per server."""

    def __init__(self, urls):
        super().__init__(urls)
        self.queues = [collections.deque() for _ in urls]
        self.admin = [common.NaiveClient(u) for u in urls]
        for i in range(len(urls)):
            t = threading.Thread(target=self._run, args=(i,), daemon=True, name=f"{self.name}-{i}")
            self.threads.append(t)
            t.start()

    def server_of(self, model: str) -> int:
        return pinned(model, len(self.urls))

    def submit(self, key: str, model: str) -> None:
        with self.lock:
            self.queues[self.server_of(model)].append((key, model))
            self.lock.notify_all()

    def _wait(self, pred) -> bool:
        with self.lock:
            while not pred():
                if self.stop.is_set():
                    return False
                self.lock.wait(0.05)
            return True

    def _admin(self, i: int, path: str, body: dict) -> int:
        try:
            return self.admin[i].post(path, body)
        except Exception:  # noqa: BLE001 - the run is over (simulators stopped) or the server failed: count it
            return 0

    def _load(self, i: int, model: str) -> None:
        if self._admin(i, "/api/v1/models/load", {"model": lms_key(model)}) != 200:
            with self.lock:
                self.failed["load"] += 1

    def _unload(self, i: int, model: str) -> None:
        self._admin(i, "/api/v1/models/unload", {"instance_id": lms_key(model)})

    def _run(self, i: int) -> None:
        raise NotImplementedError


class Sequential(_Queued):
    """One worker for the whole cluster: a single queue, one generation at a time."""

    name = "original (1 sequential worker)"

    def server_of(self, model: str) -> int:
        return 0

    def _run(self, i: int) -> None:
        if i != 0:
            return
        while self._wait(lambda: bool(self.queues[0])):
            with self.lock:
                key, model = self.queues[0].popleft()
            self._chat(pinned(model, len(self.urls)), key, model)


class Ollama(_Queued):
    name = "Ollama scheduler"
    NUM_PARALLEL = 4
    MAX_LOADED = 3

    def __init__(self, urls, model_bytes: dict[str, int], budget_bytes: int):
        self.model_bytes, self.budget = model_bytes, budget_bytes
        self.loaded = [collections.OrderedDict() for _ in urls]   # model -> last used (LRU order)
        self.running = [collections.Counter() for _ in urls]
        super().__init__(urls)

    def _run(self, i: int) -> None:
        loaded, running = self.loaded[i], self.running[i]
        while self._wait(lambda: bool(self.queues[i])):
            with self.lock:
                key, model = self.queues[i][0]
            if model not in loaded:
                def room() -> bool:
                    used = sum(self.model_bytes[m] for m in loaded)
                    return len(loaded) < self.MAX_LOADED and used + self.model_bytes[model] <= self.budget
                while not room():
                    # the least recently used runner that is idle; wait for one to become idle
                    if not self._wait(lambda: any(running[m] == 0 for m in loaded)):
                        return
                    with self.lock:
                        victim = next(m for m in loaded if running[m] == 0)
                        del loaded[victim]
                    self._unload(i, victim)
                self._load(i, model)      # one load at a time: this loop blocks meanwhile
                with self.lock:
                    loaded[model] = common.now()
            with self.lock:
                self.queues[i].popleft()
                loaded[model] = common.now()
                loaded.move_to_end(model)
                running[model] += 1

            def finished(model=model):
                running[model] -= 1
            self._spawn(i, key, model, finished)


class LlamaSwap(_Queued):
    name = "llama-swap (one model, FIFO per model)"

    def __init__(self, urls):
        self.current: list[str | None] = [None] * len(urls)
        self.running = [0] * len(urls)
        super().__init__(urls)

    def _run(self, i: int) -> None:
        while self._wait(lambda: bool(self.queues[i])):
            with self.lock:
                q = self.queues[i]
                mine = [e for e in q if e[1] == self.current[i]]
                if mine:                           # the resident model's queue first
                    key, model = mine[0]
                    q.remove(mine[0])
                    self.running[i] += 1
                else:
                    key, model = q[0]
            if model != self.current[i]:
                if not self._wait(lambda: self.running[i] == 0):
                    return
                if self.current[i] is not None:
                    self._unload(i, self.current[i])
                self._load(i, model)
                with self.lock:
                    self.current[i] = model
                continue

            def finished():
                self.running[i] -= 1
            self._spawn(i, key, model, finished)


def all_baselines(model_bytes: dict[str, int], budget_bytes: int) -> dict:
    """Every baseline by its bench/workload.py name: a factory taking the simulators' URLs."""
    return {"sequential": Sequential, "lmstudio": LmStudioJit,
            "ollama": lambda urls: Ollama(urls, model_bytes, budget_bytes),
            "llama-swap": LlamaSwap, "litellm": LiteLlmLeastBusy}


def wait_done(d: Dispatcher, keys: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with d.lock:
            if len(d.done) + sum(d.failed.values()) >= len(keys):
                return
        time.sleep(0.1)
