"""A simulator factory for tests: each test's `make_sim(**config)` starts servers that stop at teardown."""

from __future__ import annotations

from collections.abc import Iterator

from aibot.sim import SimConfig, SimServer


def sim_factory(**defaults) -> Iterator:
    """Yields `make(**kw)`; `kw` overrides `defaults`, every server started is stopped afterwards."""
    servers: list[SimServer] = []

    def make(**kw) -> SimServer:
        s = SimServer(SimConfig(**{**defaults, **kw})).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()
