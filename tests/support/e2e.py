"""A whole aibot deployment on loopback: simulated LLM servers, the fake chat server, and real
`aibot bot` / `dramatiq aibot.actors` subprocesses against a fresh database."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aibot import db
from aibot.harness import FAST_SCHEDULES, Stack, entity, write_config
from aibot.sim import SimCluster
from aibot.sim.chat import FakeChatServer
from aibot.sim.cluster import seed_spec
from tests.support import accounting
from tests.support.waiting import wait_for


@dataclass
class Deployment:
    stack: Stack
    sims: SimCluster
    chat: FakeChatServer
    db_url: str
    config_path: str

    def query(self, sql: str, params=None) -> list[dict]:
        with db.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(sql, params or ()).fetchall()

    def scalar(self, sql: str, params=None):
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def wait_replies(self, n: int, timeout: float = 120.0) -> None:
        try:
            wait_for(lambda: len(self.chat.replies()) >= n, timeout=timeout,
                     message=f"{n} replies at the chat server")
        except AssertionError:
            raise AssertionError(f"{len(self.chat.replies())}/{n} replies; job states: "
                                 f"{self.query('SELECT state, count(*) FROM aibot.jobs GROUP BY 1')}\n"
                                 f"{self.stack.logs()[-6000:]}") from None

    def peak_vs_parallel(self) -> list[tuple[str, str, int, int]]:
        """(server, model, peak concurrent at the simulator, parallel of that model there)."""
        out = []
        for server in self.sims.servers:
            parallel = {m.key: (server.config.parallel or m.parallel) for m in server.config.models}
            for model, st in server.stats()["models"].items():
                out.append((server.name, model, st["peak_in_flight"], parallel[model]))
        return out


def entities(n: int = 6, **kw) -> list[dict]:
    return [entity(f"e{i}", f"sim/model-{i}@f16", **kw) for i in range(1, n + 1)]


@contextlib.contextmanager
def deployment(db_url: str, tmp_path: Path, *, ents: list[dict] | None = None, speed: float = 0.02,
               parallel=(1, 4), preload=None, env: dict | None = None, sim_kwargs: dict | None = None,
               memory_gb: float = 128, servers: int = 2) -> Iterator[Deployment]:
    spec = seed_spec(speed=speed, parallel=parallel, preload=preload, memory_gb=memory_gb, servers=servers,
                     **(sim_kwargs or {}))
    with SimCluster(spec) as sims, FakeChatServer() as chat:
        servers = [{"name": s.name, "url": s.url, "kind": "lmstudio", "enabled": True,
                    "capabilities": {"maxMemory": memory_gb}} for s in sims.servers]
        config_path = write_config(tmp_path / "config.json", servers=servers, entities=ents or entities())
        stack = Stack(db_url, config_path, workdir=tmp_path / "logs", env={
            **FAST_SCHEDULES,
            "AIBOT_CHAT_API_URL": chat.url,
            "AIBOT_SINK": "chat",
            "AIBOT_LEASE_SECONDS": "20",
            "AIBOT_SHUTDOWN_TIMEOUT": "5",
            **(env or {}),
        })
        try:
            yield Deployment(stack, sims, chat, db_url, config_path)
            # Whatever the test did, the cluster's reported memory is the sizing's, server by server.
            assert accounting.mismatches(db_url) == []
        finally:
            stack.stop()
