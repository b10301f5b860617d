"""How many Dramatiq threads the demo starts, by the rule `aibot plan` prints.

`aibot plan` sizes workers from the slots the cluster has *now*; the demo starts its workers before any
model is loaded (0 slots), so it sizes them for the most slots the cluster can ever have: per server,
the best case of the seed's formula over how many of the catalogue's models it might hold
(placement decides which server loads which model at run time). Idle threads cost little; too few
would leave slots unused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from aibot.cluster import sizing


@dataclass(frozen=True)
class ServerCeiling:
    name: str
    slots: int
    models: int              # how many resident models give that many slots
    limited_by: str
    parallel: int


@dataclass(frozen=True)
class WorkerChoice:
    servers: tuple[ServerCeiling, ...]
    total_slots: int
    processes: int
    threads: int
    command: str

    def explain(self) -> str:
        parts = [f"{s.name} ≤ {s.slots} ({s.models} model(s) × parallel {s.parallel}, limited by {s.limited_by})"
                 for s in self.servers]
        return (f"at most {self.total_slots} slots: " + "; ".join(parts) + ". Each in-flight generation holds "
                f"one worker thread, so processes × threads ≥ slots (the rule of `aibot plan`): {self.command}")


def server_ceiling(name: str, budget: sizing.Budget, model_sizes: Sequence[int], parallel: int) -> ServerCeiling:
    """The most slots the formula gives this server for any k resident models (the k smallest, which
    leave the most memory for requests; ties keep the fewest models)."""
    sizes = sorted(model_sizes)
    best = ServerCeiling(name, 0, 0, "no models", parallel)
    for k in range(1, len(sizes) + 1):
        res = sizing.server_slots(budget, [sizing.Instance(f"m{i}", s, parallel) for i, s in enumerate(sizes[:k])])
        if res.slots > best.slots:
            best = ServerCeiling(name, res.slots, k, res.limited_by, parallel)
    return best


def choose_workers(servers: Sequence[ServerCeiling], cpu_count: int | None = None) -> WorkerChoice:
    """Processes as `aibot plan` defaults them (CPU count, at most one per slot), threads to cover every slot."""
    total = sum(s.slots for s in servers)
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    processes = max(1, min(cpus, total or 1))
    p, t, cmd = sizing.worker_command(total, processes)
    return WorkerChoice(tuple(servers), total, p, t, cmd)
