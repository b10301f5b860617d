"""Pure placement decisions: how a server's slots are split across its models, where a model should be
loaded, and which idle models make room for it.

Kept free of I/O so every rule here (fair split, eviction order, minimum residency, the memory budget)
is decided by a function a unit test can call with made-up servers.

No I/O and no state: `aibot.cluster.loader` and `aibot.cluster.slots` apply what it decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from aibot.cluster.sizing import Budget, Instance, gb, memory_bound, server_slots

DEFAULT_MIN_RESIDENCY_SECONDS = 120.0   # the cap: no model stays protected longer than this
RESIDENCY_PER_LOAD_SECOND = 10.0        # a model stays at least 10 × its own load time...
MIN_RESIDENCY_FLOOR_SECONDS = 5.0       # ...and never less than this


def min_residency(load_seconds: float | None, cap: float = DEFAULT_MIN_RESIDENCY_SECONDS) -> float:
    """How long a freshly loaded model is protected from eviction: in proportion to what its load cost
    (a 0.3 GB model that loads in 1 s need not block a swap for two minutes; a 40 GB one that took a
    minute must not be thrown out after a few seconds), within [floor, cap]. Unknown load time: the cap."""
    if load_seconds is None or load_seconds < 0:
        return cap
    return min(cap, max(MIN_RESIDENCY_FLOOR_SECONDS, RESIDENCY_PER_LOAD_SECOND * load_seconds))


# ---------------------------------------------------------------------------------------------------
# Splitting a server's slots across its loaded models
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShare:
    model: str
    parallel: int        # the most slots this model can use (its server-side parallelism)
    demand: int = 0      # queued jobs waiting for this model


def split_slots(total: int, models: Sequence[ModelShare]) -> dict[str, int]:
    """Distributes `total` slots one at a time, so a memory-bound server is shared fairly.

    Order of preference for each next slot: a model with no slot yet (every loaded model gets one if
    the total allows; those with queued demand first), then a model whose queued demand is not yet
    covered (fewest slots first), then any model below its `parallel` (fewest slots first). Ties break
    by model name so the result is deterministic and rebalancing does not churn rows.
    """
    if total < 0:
        raise ValueError(f"total slots must be >= 0, got {total}")
    alloc = {m.model: 0 for m in models}
    if len(alloc) != len(models):
        raise ValueError(f"duplicate model in split: {[m.model for m in models]}")
    remaining = total
    while remaining > 0:
        open_ = [m for m in models if alloc[m.model] < m.parallel]
        if not open_:
            break
        pick = min(open_, key=lambda m: (
            alloc[m.model] > 0,                 # first slot for everyone
            alloc[m.model] >= m.demand,         # then uncovered demand
            alloc[m.model],                     # round-robin: fewest slots first
            -m.demand,
            m.model,
        ))
        alloc[pick.model] += 1
        remaining -= 1
    return alloc


def keeps(current: Mapping[str, int], ideal: Mapping[str, int], models: Sequence[ModelShare]) -> bool:
    """Whether the split the rows have now is as good as `ideal` for the demand at hand, so it stays.

    The demand moves with every claim; a split recomputed from each instant's demand moved slots back
    and forth between ticks (1 → 2 → 1 within 153 ms). The current split stays while it uses the same
    number of slots, keeps every model within its parallel, gives every model the ideal gives a slot
    one, and covers each model's demand as far as the ideal would.
    """
    if sum(current.get(m.model, 0) for m in models) != sum(ideal.values()):
        return False
    for m in models:
        cur, want = current.get(m.model, 0), ideal.get(m.model, 0)
        if cur > m.parallel or (want >= 1 and cur < 1) or cur < min(want, m.demand):
            return False
    return True


def capped(instances: Iterable[Instance], caps: Mapping[str, int] | None) -> list[Instance]:
    """The instances with each capped model's `parallel` lowered to its cap (never raised, never < 1),
    so the sizing total and the split both see the adaptive concurrency."""
    caps = caps or {}
    return [replace(i, parallel=max(1, min(i.parallel, int(caps[i.model])))) if i.model in caps else i
            for i in instances]


def server_targets(budget: Budget, instances: Iterable[Instance],
                   demand: Mapping[str, int] | None = None,
                   current: Mapping[str, int] | None = None,
                   caps: Mapping[str, int] | None = None) -> dict[str, int]:
    """Slot rows wanted per model on one server: the sizing total split across its loaded models.

    Models that are loading or unloading get 0 (they cannot serve) but their memory still counts.
    With `current` (the active rows per model now), a split that is still as good as the fresh one
    (`keeps`) is kept, so refreshes and rebalances never undo each other's decisions. `caps` (model →
    the knee of its throughput curve, `aibot.cluster.concurrency`) lowers a model's `parallel` before
    the formula runs, so the slots it does not need go to the server's other models; a cap never
    raises anything above `parallel` or the memory bound.
    """
    instances = list(instances)
    demand = demand or {}
    instances = capped(instances, caps)
    total = server_slots(budget, instances).slots
    shares = [ModelShare(i.model, i.parallel, int(demand.get(i.model, 0)))
              for i in instances if i.state == "loaded"]
    targets = split_slots(total, shares)
    if current is not None and keeps(current, targets, shares):
        targets = {m.model: int(current.get(m.model, 0)) for m in shares}
    for inst in instances:
        targets.setdefault(inst.model, 0)
    return targets


@dataclass(frozen=True)
class SlotChange:
    """How to move one (server, model) pair's slot rows to `target`."""

    add: int = 0          # insert free rows
    unretire: int = 0     # give retired-but-held rows back their place (cheaper than add + retire)
    delete_free: int = 0  # delete free rows
    retire: int = 0       # mark held rows retired (deleted when their job releases them)

    @property
    def empty(self) -> bool:
        return not (self.add or self.unretire or self.delete_free or self.retire)


def slot_changes(target: int, free: int, held: int, retired_held: int) -> SlotChange:
    """The smallest edit that makes the pair's active rows (free + held, not retired) equal `target`.

    Held rows are never deleted (a job is using them); shrinking below the held count retires rows,
    so in-flight work finishes and the row disappears on release. Growing first un-retires.
    """
    if min(target, free, held, retired_held) < 0:
        raise ValueError(f"negative slot count: target={target} free={free} held={held} retired={retired_held}")
    active = free + held
    if target >= active:
        grow = target - active
        unretire = min(grow, retired_held)
        return SlotChange(add=grow - unretire, unretire=unretire)
    shrink = active - target
    delete_free = min(shrink, free)
    return SlotChange(delete_free=delete_free, retire=shrink - delete_free)


def server_slot_changes(total: int, targets: Mapping[str, int],
                        counts: Mapping[str, tuple[int, int, int]]) -> dict[str, SlotChange]:
    """Slot-row edits for every model of one server, never letting rows outgrow the server's total.

    `counts` maps model -> (free, held, retired_held). Each model moves toward its target, but new free
    rows are only added while free + held rows (retired ones included: their requests are still in
    flight and still use memory) stay within `total`. When capacity shrank under requests in flight,
    the newcomer's rows therefore appear only as those requests finish (next rebalance), so accounted
    memory never exceeds the budget in between. Models with the fewest rows get the room first.
    """
    models = sorted(set(targets) | set(counts))
    changes = {m: slot_changes(targets.get(m, 0), *counts.get(m, (0, 0, 0))) for m in models}
    rows = {m: counts.get(m, (0, 0, 0))[0] - changes[m].delete_free + sum(counts.get(m, (0, 0, 0))[1:])
            for m in models}
    room = max(0, total - sum(rows.values()))
    for m in sorted((m for m in models if changes[m].add), key=lambda m: (rows[m], m)):
        give = min(changes[m].add, room)
        room -= give
        c = changes[m]
        changes[m] = SlotChange(add=give, unretire=c.unretire, delete_free=c.delete_free, retire=c.retire)
    return changes


# ---------------------------------------------------------------------------------------------------
# Where to load a model, and what to evict
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resident:
    """A model resident on a server, with what eviction needs to know about it."""

    model: str
    size_bytes: int
    parallel: int = 1
    state: str = "loaded"
    held: int = 0                     # slots held = requests in flight
    loaded_at: datetime | None = None
    last_used_at: datetime | None = None
    load_seconds: float | None = None   # how long its last load took here (None: not loaded by us, unknown)
    draining: bool = False              # evicted for a starving model once its requests finish: no new work

    def instance(self) -> Instance:
        # A draining model serves nothing new (0 slots) but its memory counts until it is evicted.
        return Instance(self.model, self.size_bytes, self.parallel, "unloading" if self.draining else self.state)


@dataclass(frozen=True)
class ServerView:
    server_id: int
    name: str
    budget: Budget
    residents: tuple[Resident, ...] = ()
    can_load: bool = True             # enabled, not draining, healthy, and its API can load models
    default_parallel: int = 1         # what a new instance is assumed to serve when nothing says more
    blocked: Mapping[str, str] = field(default_factory=dict)   # model -> why this server will not take it now
    max_models: int | None = None     # the server evicts its LRU model itself beyond this many
    memory_source: str | None = None  # where budget.memory_bytes came from (for the arithmetic in refusals)

    @property
    def expected_parallel(self) -> int:
        """Parallel slots a newly loaded model will likely get here: servers load models with one
        setting (LM Studio's "Max Concurrent Predictions", llama.cpp's --parallel), so the residents
        tell us; with none loaded yet, the configured default."""
        loaded = [r.parallel for r in self.residents if r.state == "loaded"]
        return max(loaded) if loaded else max(1, self.default_parallel)

    def holds(self, model: str) -> Resident | None:
        return next((r for r in self.residents if r.model == model), None)

    @property
    def held(self) -> int:
        return sum(r.held for r in self.residents)


@dataclass(frozen=True)
class Placement:
    server_id: int
    name: str
    evict: tuple[str, ...] = ()
    free_bytes_after: int | None = None   # free memory for request buffers after load (None = unknown RAM)


@dataclass(frozen=True)
class Refusal:
    """Why no server could take the model (for logs and `aibot models load`)."""

    reasons: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return ("; ".join(f"{name}: {why}" for name, why in sorted(self.reasons.items()))
                or "no server is registered yet (the scheduler's refresh adds the configured ones)")


def evictable(server: ServerView, *, now: datetime, min_residency_s: float = DEFAULT_MIN_RESIDENCY_SECONDS,
              demand: Mapping[str, int] | None = None) -> list[Resident]:
    """Models that may be unloaded to make room, best victim first.

    Never a model with requests in flight, never one still loading/unloading, never one loaded less
    than its minimum residency ago (`min_residency`: scaled to its load time, capped at
    `min_residency_s`), so two models competing for memory do not thrash. Models without queued demand
    go first, then least recently used.
    """
    demand = demand or {}

    def settled(r: Resident) -> bool:
        return r.loaded_at is None or r.loaded_at <= now - timedelta(seconds=min_residency(r.load_seconds,
                                                                                             min_residency_s))

    candidates = [r for r in server.residents if r.state == "loaded" and r.held == 0 and settled(r)]
    oldest = datetime.min.replace(tzinfo=now.tzinfo)
    return sorted(candidates, key=lambda r: (demand.get(r.model, 0) > 0, r.last_used_at or oldest, r.model))


def _free_after(server: ServerView, size_bytes: int, evict: Sequence[str]) -> int | None:
    """Free memory for request buffers after loading `size_bytes` and evicting `evict`."""
    budget = server.budget
    if budget.memory_bytes is None:
        return None
    models = sum(r.size_bytes for r in server.residents if r.model not in evict) + size_bytes
    return budget.memory_bytes - budget.system_reserve_bytes - models - budget.safety_bytes


def room_for(server: ServerView, size_bytes: int, *, now: datetime,
             min_residency_s: float = DEFAULT_MIN_RESIDENCY_SECONDS,
             demand: Mapping[str, int] | None = None,
             candidates: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """The evictions that make room for a model of `size_bytes` on `server` (() = fits as is; None = never).

    "Room" means: after the load, the memory bound still covers every request in flight, and at
    least one request for every model that stays resident plus the new one, so loading never pushes
    accounted memory over RAM and never leaves a resident model without a slot (a model in memory that
    can serve nothing only starves the others). A server with unknown RAM always has room.
    `candidates` (the demand policy's victims, in order: `aibot.cluster.demand`) replaces the default
    victims; only those loaded and idle may still go.
    """
    budget = server.budget
    evict: list[str] = []
    if candidates is None:
        victims = evictable(server, now=now, min_residency_s=min_residency_s, demand=demand)
    else:
        by_name = {r.model: r for r in server.residents}
        victims = [by_name[m] for m in candidates
                   if m in by_name and by_name[m].state == "loaded" and by_name[m].held == 0]
    while True:
        staying = [r for r in server.residents if r.model not in evict]
        # A server that evicts by itself beyond `max_models` would choose its own victim, perhaps one
        # with work in flight: we evict an idle one first, so its eviction never happens.
        count_ok = server.max_models is None or len(staying) + 1 <= server.max_models
        need = max(server.held + 1, len(staying) + 1)
        models = sum(r.size_bytes for r in staying) + size_bytes
        bound = memory_bound(budget, models)
        if count_ok and (budget.memory_bytes is None or (bound is not None and bound >= need)):
            return tuple(evict)
        if not victims:
            return None
        evict.append(victims.pop(0).model)


def slots_gained(server: ServerView, size_bytes: int, evict: Iterable[str]) -> int:
    """How many slots the server's sizing gains if `evict` go and the model arrives (at the server's
    expected parallel): the capacity this placement buys."""
    gone = set(evict)
    before = [r.instance() for r in server.residents]
    after = [r.instance() for r in server.residents if r.model not in gone]
    after.append(Instance("(new)", size_bytes, server.expected_parallel, "loaded"))
    return server_slots(server.budget, after).slots - server_slots(server.budget, before).slots


def no_room_reason(server: ServerView, size_bytes: int, size_source: str | None, *, now: datetime,
                   min_residency_s: float = DEFAULT_MIN_RESIDENCY_SECONDS) -> str:
    """Why `room_for` said no, with the arithmetic and where each number came from, so an operator can
    see at once whether a figure is wrong (a model size that was only assumed, a RAM figure from config)."""
    b = server.budget
    resident = sum(r.size_bytes for r in server.residents)
    idle = evictable(server, now=now, min_residency_s=min_residency_s)
    busy = [r.model for r in server.residents if r not in idle]
    size = f"{gb(size_bytes)} ({size_source or 'size source unknown'})"
    if server.max_models is not None and len(server.residents) + 1 > server.max_models and not idle:
        return (f"it keeps at most {server.max_models} model(s) and every resident one is busy or recently "
                f"loaded ({', '.join(busy) or 'none'}); the model needs {size}")
    parts = [f"needs {size} + {gb(b.per_request_bytes)} per request"]
    if b.memory_bytes is not None:
        free = b.memory_bytes - b.system_reserve_bytes - b.safety_bytes - resident
        parts.append(f"RAM {gb(b.memory_bytes)} ({server.memory_source or 'source unknown'}) − system reserve "
                     f"{gb(b.system_reserve_bytes)} − safety {gb(b.safety_bytes)} − resident models {gb(resident)}"
                     f" = {gb(free)} free")
    parts.append(f"idle models that may be evicted: {', '.join(r.model for r in idle) or 'none'}"
                 + (f"; busy or recently loaded: {', '.join(busy)}" if busy else ""))
    return "not enough memory even after evicting idle models: " + "; ".join(parts)


def choose_server(servers: Iterable[ServerView], model: str, size_bytes: int, *, now: datetime,
                  min_residency_s: float = DEFAULT_MIN_RESIDENCY_SECONDS,
                  demand: Mapping[str, int] | None = None, size_source: str | None = None) -> Placement | Refusal:
    """The server to load `model` on: fewest evictions of idle models first, then the most slots
    gained (a parallel-4 server serves a hot model four times as fast as a parallel-1 one), then the
    most free memory. Unknown-RAM servers rank below any server with known room.
    """
    fitting: list[tuple[tuple, Placement]] = []
    refusal = Refusal()
    for server in servers:
        if not server.can_load:
            refusal.reasons[server.name] = "not eligible (disabled, draining, down, or cannot load models)"
            continue
        if server.holds(model) is not None:
            refusal.reasons[server.name] = f"already holds {model}"
            continue
        if model in server.blocked:
            refusal.reasons[server.name] = server.blocked[model]
            continue
        evict = room_for(server, size_bytes, now=now, min_residency_s=min_residency_s, demand=demand)
        if evict is None:
            refusal.reasons[server.name] = no_room_reason(server, size_bytes, size_source, now=now,
                                                          min_residency_s=min_residency_s)
            continue
        free = _free_after(server, size_bytes, evict)
        rank = (len(evict), -slots_gained(server, size_bytes, evict), free is None, -(free or 0), server.name)
        fitting.append((rank, Placement(server.server_id, server.name, evict, free)))
    if not fitting:
        return refusal
    return min(fitting, key=lambda f: f[0])[1]
