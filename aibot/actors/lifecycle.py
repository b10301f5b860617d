"""Process-level duties of a worker, hooked into Dramatiq's lifecycle.

- boot: build the shared Runtime, register the process in `aibot.workers`, start the heartbeat that
  renews the leases of every claim in flight (one thread per process, not one per job);
- SIGTERM (Dramatiq's `before_worker_shutdown`): stop claiming, let generations in flight finish until
  `Settings.shutdown_timeout` (AIBOT_SHUTDOWN_TIMEOUT, default 30 s), then release what is left back to the queue with the
  attempt refunded and close the HTTP clients so blocked reads return; nothing is left `running`.
  A second SIGTERM makes Dramatiq exit at once; leases then recover whatever was in flight.

The work is `aibot.worker.runtime`'s and the process registry `aibot.worker.registry`'s; this module
only wires them to Dramatiq's hooks.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import dramatiq

from aibot import log
from aibot.worker import registry
from aibot.worker.runtime import Runtime

logger = logging.getLogger(__name__)

_runtime = None
_runtime_lock = threading.Lock()


def runtime():
    """The process's Runtime, created on first use (after Dramatiq forked this process)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


class Lifecycle(dramatiq.Middleware):
    def __init__(self) -> None:
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def before_worker_boot(self, broker, worker) -> None:
        # Dramatiq prefetches twice the thread count by default; a doorbell held in one process's
        # buffer while another process has idle threads leaves a slot unused. One per thread is
        # enough: an invocation keeps claiming by itself. `dramatiq_queue_prefetch` still overrides.
        if not os.environ.get("dramatiq_queue_prefetch"):
            worker.queue_prefetch = worker.worker_threads

    def after_worker_boot(self, broker, worker) -> None:
        rt = runtime()
        log.bind(worker=rt.worker_id)
        log.bind_process(worker=rt.worker_id)   # Dramatiq's and psycopg_pool's own threads name it too
        with rt.database.transaction() as conn:
            registry.register(conn, rt.worker_id, role="worker",
                              info={"threads": getattr(worker, "worker_threads", None), "lease_seconds": rt.lease_seconds})
        self._heartbeat = threading.Thread(target=self._beat, args=(rt,), name="aibot-heartbeat", daemon=True)
        self._heartbeat.start()
        logger.info("worker ready (lease %.0fs renewed every %.1fs, invocation budget %.0fs)",
                    rt.lease_seconds, rt.settings.renewal_seconds(), rt.budget_seconds)

    def _beat(self, rt) -> None:
        log.bind(worker=rt.worker_id)   # a new thread starts with an empty log context
        interval = rt.settings.renewal_seconds()
        while not self._stop_heartbeat.wait(interval):
            try:
                rt.renew_leases()   # the claims in flight and the process's heartbeat, one transaction
            except Exception as exc:  # the database may be restarting; a lease outlasts two missed renewals
                logger.warning("heartbeat failed: %s", exc)

    def before_worker_shutdown(self, broker, worker) -> None:
        rt = runtime()
        rt.stopping.set()
        timeout = rt.settings.shutdown_timeout
        logger.info("shutting down: %d generation(s) in flight get %.0fs to finish", len(rt.inflight), timeout)
        threading.Thread(target=self._drain, args=(rt, timeout), name="aibot-drain", daemon=True).start()

    def _drain(self, rt, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(rt.inflight) and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(rt.inflight):
            try:
                rt.release_all("shutdown timeout reached")
            except Exception as exc:
                logger.error("could not release in-flight jobs (%s); their leases will expire", exc)
            rt.backends.close_all()

    def after_worker_shutdown(self, broker, worker) -> None:
        rt = runtime()
        self._stop_heartbeat.set()
        if len(rt.inflight):
            rt.release_all("worker stopped")
        try:
            with rt.database.transaction() as conn:
                registry.unregister(conn, rt.worker_id)
        except Exception as exc:
            logger.warning("could not unregister: %s", exc)
        rt.close()
        logger.info("worker stopped")
