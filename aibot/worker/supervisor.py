"""`aibot worker`: one Dramatiq master per worker process, each restarted on its own when it dies.

Why: a Dramatiq master treats the unexpected death of any of its worker processes as fatal -- it logs
"Worker with PID … exited unexpectedly … Shutting down…" and stops every sibling, so one kill -9'd (or
OOM-killed) child interrupts every generation on the host until a supervisor restarts the whole
master. Dramatiq (1.x) has no option to replace a dead child. So this supervisor runs P masters of
one process each (`dramatiq aibot.actors --processes 1 --threads T`): a dead child takes only its own
master down, the supervisor restarts that one, and the other P − 1 keep claiming and generating.
The supervisor saw the child die, so it does not wait for the dead child's leases
(`AIBOT_LEASE_SECONDS`, 20 s by default): it ends them at once (`jobs.expire_leases_of` for the worker
processes of this host that are registered but gone), and the next reclaim tick (5 s) re-queues the
jobs; a reply already generated is re-sent from the job row, not generated again.

A master that keeps dying is restarted with a growing delay (`restart_delay`: at once for a rare
death, up to 30 s in a crash loop), so a broken deployment does not spin. SIGTERM/SIGINT is passed to
every master (each finishes or releases its generations within AIBOT_SHUTDOWN_TIMEOUT) and the
supervisor exits 0 when all are gone; systemd's `Restart=always` then covers the supervisor itself
(see docs/operations.md). This module owns process management only; the work is `aibot.actors`'.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aibot import log

logger = logging.getLogger(__name__)

#: Deaths of one master within this many seconds count towards its restart delay.
CRASH_WINDOW_SECONDS = 60.0
RESTART_BASE_SECONDS = 0.5
RESTART_CAP_SECONDS = 30.0
#: How long after SIGTERM (beyond the shutdown timeout) a master may take before it is killed.
STOP_GRACE_SECONDS = 15.0


def restart_delay(deaths: Sequence[float], now: float, *, window: float = CRASH_WINDOW_SECONDS,
                  base: float = RESTART_BASE_SECONDS, cap: float = RESTART_CAP_SECONDS) -> float:
    """Seconds to wait before restarting a master, given the monotonic times it died (this one
    included). The first death in a window restarts at once; each further one doubles from `base`."""
    recent = sum(1 for t in deaths if now - t <= window)
    if recent <= 1:
        return 0.0
    return min(cap, base * 2.0 ** (recent - 2))


def master_command(threads: int, *, shutdown_timeout_seconds: float, extra: Sequence[str] = ()) -> list[str]:
    """One Dramatiq master with one worker process, run by the same interpreter as the supervisor."""
    # Dramatiq's own deadline sits past aibot's (AIBOT_SHUTDOWN_TIMEOUT, after which the generations
    # left are released): Dramatiq then only waits for threads that already let go of their jobs.
    return [sys.executable, "-m", "dramatiq", "aibot.actors", "--processes", "1", "--threads", str(threads),
            "--worker-shutdown-timeout", str(int((shutdown_timeout_seconds + STOP_GRACE_SECONDS) * 1000)), *extra]


@dataclass
class Slot:
    index: int
    popen: subprocess.Popen | None = None
    deaths: list[float] = field(default_factory=list)
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, processes: int, threads: int, *, shutdown_timeout_seconds: float = 30.0,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None, poll_seconds: float = 0.2) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"--processes must be an int >= 1, got {processes!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"--threads must be an int >= 1, got {threads!r}")
        self.command = master_command(threads, shutdown_timeout_seconds=shutdown_timeout_seconds, extra=extra)
        self.shutdown_timeout = shutdown_timeout_seconds
        self.env = env
        self.poll_seconds = poll_seconds
        self.slots = [Slot(i + 1) for i in range(processes)]
        self.stopping = threading.Event()

    def _start(self, slot: Slot) -> None:
        # The supervisor's own process group: a kill of the host's group (systemd's cgroup, launchd's
        # job, kill -9 -PGID) takes every master with it, and a terminal's Ctrl-C reaches them all.
        slot.popen = subprocess.Popen(self.command, env=self.env)
        slot.restart_at = None
        logger.info("worker slot %d: started master pid %d", slot.index, slot.popen.pid)

    def pids(self) -> dict[int, int | None]:
        """Slot -> its running master's pid (None while it waits to restart)."""
        return {s.index: s.popen.pid if s.popen and s.popen.poll() is None else None for s in self.slots}

    def run(self) -> int:
        """Starts every master and keeps them running until `stop()` (or SIGTERM/SIGINT when installed)."""
        log.bind_process(worker=log.default_worker_name("supervisor"))
        for slot in self.slots:
            self._start(slot)
        while not self.stopping.wait(self.poll_seconds):
            now = time.monotonic()
            for slot in self.slots:
                if slot.popen is not None and (code := slot.popen.poll()) is not None:
                    slot.deaths.append(now)
                    slot.deaths[:] = [t for t in slot.deaths if now - t <= CRASH_WINDOW_SECONDS]
                    delay = restart_delay(slot.deaths, now)
                    logger.error("worker slot %d: master pid %d exited (code %s); the other %d keep running, "
                                 "restarting it in %.1fs", slot.index, slot.popen.pid, code,
                                 sum(1 for s in self.slots if s is not slot and s.popen and s.popen.poll() is None),
                                 delay)
                    slot.popen, slot.restart_at = None, now + delay
                    self.hand_back_dead()
                if slot.popen is None and slot.restart_at is not None and now >= slot.restart_at:
                    slot.restarts += 1
                    self._start(slot)
        return self._stop_all()

    def hand_back_dead(self) -> list[int]:
        """Ends the leases of jobs held by this host's worker processes that are gone, and forgets those
        processes; returns the job ids. Best effort: if the database is away, the leases expire anyway."""
        from aibot import db
        from aibot.queue import jobs
        from aibot.worker import registry

        def step(conn):
            dead = registry.dead_on_this_host(conn, _alive)
            ids = jobs.expire_leases_of(conn, dead)
            for worker_id in dead:
                registry.unregister(conn, worker_id)
            return dead, ids

        try:
            if self._database is None:
                self._database = db.Database(max_size=1)
            dead, ids = self._database.retrying("hand back a dead worker's jobs", step)
        except Exception as exc:
            logger.warning("could not hand back the dead worker's jobs (%s: %s); their leases will expire",
                           type(exc).__name__, exc)
            return []
        if dead:
            logger.warning("dead worker process(es) %s held job(s) %s: their leases end now, the reclaim re-queues "
                           "them", ", ".join(dead), ", ".join(map(str, ids)) or "none")
        return ids

    _database = None

    def stop(self, *, forward: bool = True) -> None:
        """Stops every master. `forward=False` when they got the signal themselves (Ctrl-C reaches the
        whole foreground group): Dramatiq treats a second signal as "exit now", not "stop gently"."""
        self._forward = forward
        self.stopping.set()

    _forward = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop(forward=False))

    def _stop_all(self) -> int:
        running = [s.popen for s in self.slots if s.popen is not None and s.popen.poll() is None]
        logger.info("stopping %d master(s): each finishes or releases its generations within %.0fs",
                    len(running), self.shutdown_timeout)
        for p in running if self._forward else ():
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.shutdown_timeout + STOP_GRACE_SECONDS
        for p in running:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("master pid %d did not stop in time; killing it (its leases recover its jobs)", p.pid)
                p.kill()
        if self._database is not None:
            self._database.close()
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process now has that pid: not ours, leave it alone
        return True
    return True
