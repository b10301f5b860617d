"""Process-group and polling primitives shared by the harness, the test rigs and the benchmarks.

Why here: every rig that starts real processes (Stack, the llama.cpp router rig, the benchmarks) needs
to kill a whole process group as a crash would and to wait on a condition with a deadline instead of a
guessed sleep; one copy keeps their semantics (SIGKILL the group, bounded reap, truthy-value polling)
the same everywhere. Production code never imports this module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def kill_group(popen: subprocess.Popen | None, reap_seconds: float = 10) -> None:
    """SIGKILL the process group led by `popen` (a crash, as far as its clients can tell) and reap it."""
    if popen is None:
        return
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(reap_seconds)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.01,
               error: type[Exception] = TimeoutError) -> T:
    """Polls `pred` until it returns a truthy value and returns it; raises `error` naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
