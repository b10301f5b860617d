"""Runs aibot's processes (bot + scheduler, Dramatiq workers) as real subprocesses, as in production.

Used by `aibot demo`, the end-to-end and chaos tests and the benchmarks, so all of them exercise the
same commands an operator runs (`aibot bot`, `dramatiq aibot.actors`). Every process writes its log to
a file in the stack's directory; `stop()` sends SIGTERM, waits, and kills what is left, so nothing
outlives the stack. The processes import the same aibot as the caller (its directory goes first on
PYTHONPATH), whatever their working directory.

`FAST_SCHEDULES` is the environment that runs every scheduled job at its declared fast schedule
(`aibot.scheduler.jobs`), so tests and benchmarks see ticks within a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aibot
from aibot.harness.procs import kill_group
from aibot.scheduler.jobs import fast_schedules

FAST_SCHEDULES = fast_schedules()
#: Where the aibot these processes must import lives (a worktree, an editable install, a wheel).
AIBOT_ROOT = str(Path(aibot.__file__).resolve().parent.parent)


@dataclass
class Proc:
    name: str
    args: list[str]
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig) if sig == signal.SIGKILL else self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL for the whole process group after `timeout` seconds."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        kill_group(self.popen)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Stack:
    database_url: str
    config_path: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._own_dir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="aibot-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [AIBOT_ROOT, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != AIBOT_ROOT]]
        env.update({
            "AIBOT_DATABASE_URL": self.database_url,
            "AIBOT_CONFIG": self.config_path,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(path),
            # Harness loads (simulated, or the 270M test model) finish in seconds, so a dead loader's
            # load is settled after 30 s instead of production's 300 s (sized for 15 GB models).
            "AIBOT_ORPHAN_LOAD_GRACE_SECONDS": env.get("AIBOT_ORPHAN_LOAD_GRACE_SECONDS", "30"),
        })
        env.update(self.env)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        out = open(log_path, "ab")
        popen = subprocess.Popen(
            args, env={**self.base_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: kill -9 reaches children
        )
        out.close()
        proc = Proc(name, args, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_bot(self, name: str = "bot", *, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [sys.executable, "-m", "aibot", "bot", *args], env)

    def start_scheduler(self, name: str = "scheduler", env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [sys.executable, "-m", "aibot", "scheduler"], env)

    def start_workers(self, name: str = "workers", *, processes: int = 1, threads: int = 8,
                      shutdown_timeout_ms: int = 60_000, env: dict[str, str] | None = None) -> Proc:
        dramatiq = shutil.which("dramatiq", path=os.path.dirname(sys.executable)) or shutil.which("dramatiq")
        cmd = [dramatiq, "aibot.actors", "--processes", str(processes), "--threads", str(threads),
               "--worker-shutdown-timeout", str(shutdown_timeout_ms)]
        return self.spawn(name, cmd, {"AIBOT_WORKER_NAME": name, **(env or {})})

    def stop(self, timeout: float = 30.0) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.popen.wait(remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
            # Dramatiq's master waits for its children; make sure none survive in the group.
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} (pid {p.pid}, rc {p.popen.poll()}) =====\n{p.log()[-20000:]}" for p in self.procs)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
