"""A claim-generate-complete loop run in spawned processes by test_dispatch_invariant.py.

It uses the product's claim and backends but not Dramatiq, so 16 threads in each of 4 processes race
on the claim as hard as possible.
"""

from __future__ import annotations

import threading
import time

from aibot import db
from aibot.backends.base import ChatRequest
from aibot.backends.factory import backend_for_server
from aibot.queue import jobs


def run_process(db_url: str, worker: str, threads: int, total_jobs: int, deadline_s: float) -> list[int]:
    done: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + deadline_s

    def loop(n: int) -> None:
        backends = {}
        with db.connect(db_url, autocommit=True) as conn:
            servers = {r["id"]: r for r in conn.execute("SELECT * FROM aibot.servers").fetchall()}
            while time.monotonic() < deadline:
                claim = jobs.claim(conn, f"{worker}-{n}", lease_seconds=60, use_slots=True)
                if claim is None:
                    if conn.execute("SELECT count(*) AS n FROM aibot.jobs WHERE state <> 'done'").fetchone()["n"] == 0:
                        return
                    time.sleep(0.005)  # all slots busy: try again (this is the racing claimer itself)
                    continue
                backend = backends.get(claim.server_id)
                if backend is None:
                    backend = backends[claim.server_id] = backend_for_server(servers[claim.server_id])
                backend.chat(ChatRequest(model=claim.model, messages=[{"role": "user", "content": "hi"}]))
                assert jobs.complete(conn, claim.job_id, claim.token)
                with lock:
                    done.append(claim.job_id)
        for b in backends.values():
            b.close()

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return done
