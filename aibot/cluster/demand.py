"""Pure demand decisions: which model wins memory when not every queued model fits, when a hot model
gets a replica and when it gives it back, which idle models are unloaded. No I/O.

The rules, and why:

- **Starvation bound.** A job whose model is resident nowhere is never a claim candidate, so the
  queue's aging cannot help it: only a load can. Once the oldest runnable job of a model resident
  nowhere has waited `aging_s`, that model wins a swap on some server *whatever else is resident*:
  residency protection is waived and a victim with requests in flight is drained (no new claims, its
  in-flight requests finish) and then evicted. Its wait is therefore bounded by
  aging + (the victim's longest request) + its own load time.
- **Swaps stay rare.** Before that age a swap happens only when the victim has no queued work and has
  been resident for its minimum residency (scaled to its own load time), and, unless every victim is
  cold (no arrival in the rate window), only when the incoming model's waiting work is worth its load
  (expected service of its queue ≥ its load time).
- **Victims.** When a starving model must push someone out, the victim is the resident whose own
  demand is least (fewest queued, then lowest recent arrival rate, then least recently used); a
  resident whose oldest job has waited even longer is never the victim.
- **Replicas.** A model resident somewhere whose queue exceeds `replica_queue_factor` × its slots (or
  whose arrival rate exceeds what its slots serve) gets a replica on the server that minimises the
  expected time to first token of its waiting work (load time there + the queue's share per slot;
  ServerlessLLM, OSDI '24), never evicting a model with work queued or in flight. A surplus replica
  (no queue, arrivals its other replicas absorb) is retired once it has been unused longer than its
  residency.
- **Idle unload.** With `keep_loaded` false (or a per-model TTL), a model with nothing queued and
  nothing in flight that has been unused longer than its TTL is unloaded.

`aibot.cluster.loader` reads one snapshot per pass and applies what these functions decide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aibot.cluster.placement import Refusal, Resident, ServerView, choose_server, slots_gained
from aibot.cluster.sizing import memory_bound

DEFAULT_AGING_S = 30.0


@dataclass(frozen=True)
class Policy:
    """The knobs of the demand decisions (clusterSettings in the entity config; see docs/cluster.md)."""

    aging_s: float = DEFAULT_AGING_S          # a model resident nowhere wins a swap once its oldest job waited this long
    residency_per_load_s: float = 10.0        # minimum residency = this × the model's load time ...
    residency_floor_s: float = 5.0            # ... at least this ...
    residency_cap_s: float = 120.0            # ... at most this (also the residency of an unknown load time)
    service_s: float = 10.0                   # expected seconds one request holds a slot (until measured)
    default_load_s: float = 30.0              # a model's load time before it was ever measured
    replica_queue_factor: float = 2.0         # replica when queued > this × the model's slots
    max_replicas: int | None = None           # None: as many as servers with room
    keep_loaded: bool = True                  # False: models idle longer than idle_ttl_s are unloaded
    idle_ttl_s: float = 300.0                 # clusterSettings.modelUnloadDelay
    model_ttl_s: Mapping[str, float] = field(default_factory=dict)   # per-model idle TTL (applies even when keep_loaded)
    pass_s: float = 2.0                       # the longest gap between two demand passes (scheduler tick, worker kicks)

    def __post_init__(self) -> None:
        for name in ("aging_s", "service_s", "default_load_s", "replica_queue_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"demand policy {name} must be a finite number > 0, got {v!r}")
        for name in ("residency_per_load_s", "residency_floor_s", "residency_cap_s", "idle_ttl_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"demand policy {name} must be a finite number >= 0, got {v!r}")
        if self.residency_floor_s > self.residency_cap_s:
            raise ValueError(f"demand policy residency_floor_s ({self.residency_floor_s}) must not exceed "
                             f"residency_cap_s ({self.residency_cap_s})")

    def min_residency(self, load_s: float | None) -> float:
        """How long a freshly loaded model is protected from an ordinary swap: in proportion to what its
        load cost, within [floor, cap]; unknown load time: the cap."""
        if load_s is None or load_s < 0:
            return self.residency_cap_s
        return min(self.residency_cap_s, max(self.residency_floor_s, self.residency_per_load_s * load_s))

    def ttl(self, model: str) -> float | None:
        """The idle TTL of `model`: its own, else the cluster's when models are not kept loaded, else None."""
        if model in self.model_ttl_s:
            return self.model_ttl_s[model]
        return None if self.keep_loaded else self.idle_ttl_s


@dataclass(frozen=True)
class ModelDemand:
    """One model's demand as the queue shows it at one instant."""

    model: str
    queued: int = 0            # runnable queued jobs
    oldest_wait_s: float = 0.0  # how long its oldest runnable queued job has waited
    rate_per_s: float = 0.0    # recent arrivals per second
    inflight: int = 0          # running jobs
    load_s: float | None = None  # its last measured load time anywhere (None: never measured)
    service_s: float | None = None  # its recent mean generation time (None: none finished lately)

    def service(self, policy: Policy) -> float:
        return self.service_s if self.service_s and self.service_s > 0 else policy.service_s

    def load(self, policy: Policy) -> float:
        return self.load_s if self.load_s is not None and self.load_s >= 0 else policy.default_load_s

    def starved(self, policy: Policy) -> bool:
        """Whether its oldest job is due: the swap starts early enough that the model is resident by
        aging + load time: two passes (the one that drains, the one that evicts) plus one request's
        drain ahead of the aging time, at most half of it."""
        lead = min(policy.aging_s / 2, 2 * policy.pass_s + self.service(policy))
        return self.queued > 0 and self.oldest_wait_s >= policy.aging_s - lead


# ---------------------------------------------------------------------------------------------------
# Swaps: which resident makes room for a model resident nowhere
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Swap:
    """Make room for `model` on `server_id`: evict `evict` now, or first drain `drain` (stop new claims
    on them and let their in-flight requests finish; the eviction follows on a later pass)."""

    server_id: int
    server: str
    model: str
    evict: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    starved: bool = False
    ettft_s: float = 0.0


def worth_load(d: ModelDemand, load_s: float, policy: Policy) -> bool:
    """Whether `d`'s waiting work pays for a load that pushes another model out: the service its queue
    (and what arrives during the load) needs is at least the load time. A starving model is always worth it."""
    if d.starved(policy):
        return True
    expected = (d.queued + d.rate_per_s * load_s) * d.service(policy)
    return d.queued > 0 and expected >= load_s


def victims(server: ServerView, incoming: ModelDemand, demand: Mapping[str, ModelDemand], *, now: datetime,
            policy: Policy) -> list[Resident]:
    """Residents of `server` that may leave for `incoming`, best victim first.

    Never one still loading or unloading. Not starving: only those with no queued work, no request in
    flight, resident past their minimum residency. Starving: any loaded resident except one whose own
    oldest job waited longer than the incoming model's (a victim with requests in flight is drained
    first, see `swap_for`).
    """
    starving = incoming.starved(policy)
    out = []
    for r in server.residents:
        if r.state != "loaded" or r.model == incoming.model:
            continue
        own = demand.get(r.model, ModelDemand(r.model))
        settled = r.loaded_at is None or r.loaded_at <= now - timedelta(seconds=policy.min_residency(r.load_seconds))
        if starving:
            if own.queued > 0 and own.oldest_wait_s > incoming.oldest_wait_s:
                continue
        elif not (settled and r.held == 0 and own.queued == 0):
            continue
        out.append(r)
    oldest = datetime.min.replace(tzinfo=now.tzinfo)

    def key(r: Resident):
        own = demand.get(r.model, ModelDemand(r.model))
        return (not r.draining, own.queued > 0, own.queued + own.inflight, own.rate_per_s, r.held, r.last_used_at or oldest, r.model)
    return sorted(out, key=key)


def expected_ttft(server: ServerView, d: ModelDemand, evict: Sequence[str], policy: Policy,
                  size_bytes: int) -> float:
    """Expected time to first token of `d`'s waiting work if it is loaded on `server` after `evict` go:
    the load time (behind the loads already running there, which share its disk and memory bandwidth)
    plus the mean job's wait behind the queue on the slots the sizing gains there (half the time the
    queue takes to drain through them): ServerlessLLM's startup-time-aware placement, with aibot's slot
    arithmetic."""
    pending = sum(1 for r in server.residents if r.state == "loading")
    slots = max(1, slots_gained(server, size_bytes, evict))
    return d.load(policy) * (1 + pending) + 0.5 * (d.queued / slots) * d.service(policy)


def swap_for(servers: Iterable[ServerView], incoming: ModelDemand, demand: Mapping[str, ModelDemand], *,
             now: datetime, policy: Policy, size_bytes: int) -> Swap | None:
    """Where `incoming` (resident nowhere) should be loaded and what must leave, or None (keep waiting).

    A server with room as it is wins first; then the swap with the fewest victims, and among equals the
    lowest expected time to first token. A starving model takes a swap even if the victims still have
    requests in flight (they are drained); otherwise only idle, settled, unqueued victims go, and only
    when the incoming work is worth its load.
    """
    load = incoming.load(policy)
    options = []
    for s in servers:
        if not s.can_load or s.holds(incoming.model) is not None or incoming.model in s.blocked:
            continue
        order = victims(s, incoming, demand, now=now, policy=policy)
        plan = _room(s, size_bytes, order)
        if plan is None:
            continue
        # A victim nobody asked for lately costs nothing to lose; one still in use is only pushed out
        # for work that pays for the load.
        cold = all(demand.get(m, ModelDemand(m)).rate_per_s == 0 for m in plan)
        if plan and not cold and not worth_load(incoming, load, policy):
            continue
        busy = tuple(m for m in plan if s.holds(m).held > 0)
        swap = Swap(s.server_id, s.name, incoming.model, () if busy else plan, plan if busy else (),
                    incoming.starved(policy), expected_ttft(s, incoming, plan, policy, size_bytes))
        free = _free_bytes(s, size_bytes, plan)
        options.append(((len(plan), bool(busy), round(swap.ettft_s, 3), free is None, -(free or 0), s.name), swap))
    if not options:
        return None
    return min(options, key=lambda o: o[0])[1]


def _free_bytes(server: ServerView, size_bytes: int, evict: Sequence[str]) -> int | None:
    """Memory left for request buffers after the load (None: unknown RAM)."""
    b = server.budget
    if b.memory_bytes is None:
        return None
    models = sum(r.size_bytes for r in server.residents if r.model not in evict) + size_bytes
    return b.memory_bytes - b.system_reserve_bytes - b.safety_bytes - models


def _room(server: ServerView, size_bytes: int, order: Sequence[Resident]) -> tuple[str, ...] | None:
    """The shortest prefix of `order` whose eviction makes room (placement's rule: every resident and
    the newcomer keep at least one slot, requests in flight of the staying models stay covered)."""
    evict: list[str] = []
    pool = list(order)
    while True:
        staying = [r for r in server.residents if r.model not in evict]
        count_ok = server.max_models is None or len(staying) + 1 <= server.max_models
        held = sum(r.held for r in staying)
        need = max(held + 1, len(staying) + 1)
        models = sum(r.size_bytes for r in staying) + size_bytes
        bound = memory_bound(server.budget, models)
        if count_ok and (server.budget.memory_bytes is None or (bound is not None and bound >= need)):
            return tuple(evict)
        if not pool:
            return None
        evict.append(pool.pop(0).model)


# ---------------------------------------------------------------------------------------------------
# Replicas
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Replica:
    server_id: int
    server: str
    model: str
    ettft_s: float       # first token on the replica: its load time there
    wait_now_s: float    # the time the backlog takes on the slots the model has now


def replica_for(servers: Sequence[ServerView], d: ModelDemand, slots_now: int, *, now: datetime,
                policy: Policy, size_bytes: int, demand: Mapping[str, ModelDemand] | None = None) -> Replica | None:
    """A server to add a replica of `d.model` on, or None.

    Only when its queue exceeds `replica_queue_factor` × the slots it has (or its arrival rate exceeds
    what they serve), only on a server that has room without evicting a model with work queued or in
    flight, and only when the backlog (queued plus what arrives during the load) drains sooner with the
    replica (it serves after its load; the slots it has keep serving meanwhile) than without it.
    Among candidates: fewest evictions of idle models, then the soonest drain.
    """
    demand = demand or {}
    holders = [s for s in servers if (r := s.holds(d.model)) is not None]
    if not holders or any(s.holds(d.model).state != "loaded" for s in holders):
        return None   # not resident yet (a swap's business), or a replica is already on its way
    if policy.max_replicas is not None and len(holders) >= policy.max_replicas:
        return None
    slots_now = max(1, slots_now)
    service = d.service(policy)
    if d.queued < policy.replica_queue_factor * slots_now and d.rate_per_s <= slots_now / service:
        return None
    load = d.load(policy)
    backlog = d.queued + d.rate_per_s * load          # what waits once a replica could serve
    drain_now = backlog * service / slots_now         # time the backlog takes on the slots it has
    best = None
    for s in servers:
        if not s.can_load or s.holds(d.model) is not None or d.model in s.blocked:
            continue
        idle = [r for r in victims(s, ModelDemand(d.model), demand, now=now, policy=policy)]
        plan = _room(s, size_bytes, idle)
        if plan is None:
            continue
        gained = max(1, min(s.expected_parallel, slots_gained(s, size_bytes, plan)))
        # The replica serves after its load; meanwhile the existing slots keep draining the backlog.
        left = max(0.0, backlog - load * slots_now / service)
        drain_with = load + left * service / (slots_now + gained)
        if drain_with >= drain_now:
            continue
        cand = ((len(plan), drain_with, s.name), Replica(s.server_id, s.name, d.model, load, drain_now))
        if best is None or cand[0] < best[0]:
            best = cand
    return None if best is None else best[1]


@dataclass(frozen=True)
class Unload:
    server_id: int
    server: str
    model: str
    reason: str


def surplus_replicas(servers: Sequence[ServerView], demand: Mapping[str, ModelDemand], *, now: datetime,
                     policy: Policy) -> list[Unload]:
    """Replicas to retire: a model on several servers with nothing queued whose arrivals the others
    serve; the replica unused the longest goes, once it has been unused longer than its residency."""
    out = []
    by_model: dict[str, list[tuple[ServerView, Resident]]] = {}
    for s in servers:
        for r in s.residents:
            if r.state == "loaded":
                by_model.setdefault(r.model, []).append((s, r))
    oldest = datetime.min.replace(tzinfo=now.tzinfo)
    for model, held in sorted(by_model.items()):
        if len(held) < 2:
            continue
        d = demand.get(model, ModelDemand(model))
        if d.queued > 0:
            continue
        s, r = min(held, key=lambda h: (h[1].held, h[1].last_used_at or oldest, h[0].name))
        others = sum(x.parallel for srv, x in held if x is not r)
        if r.held > 0 or d.rate_per_s > others / d.service(policy):
            continue
        idle_since = r.last_used_at or r.loaded_at or oldest
        if idle_since <= now - timedelta(seconds=policy.min_residency(r.load_seconds)):
            out.append(Unload(s.server_id, s.name, model, "surplus replica"))
    return out


def idle_unloads(servers: Sequence[ServerView], demand: Mapping[str, ModelDemand], *, now: datetime,
                 policy: Policy) -> list[Unload]:
    """Models idle longer than their TTL (`Policy.ttl`), never with work queued or in flight."""
    out = []
    oldest = datetime.min.replace(tzinfo=now.tzinfo)
    for s in servers:
        for r in s.residents:
            ttl = policy.ttl(r.model)
            if ttl is None or r.state != "loaded" or r.held > 0:
                continue
            d = demand.get(r.model, ModelDemand(r.model))
            if d.queued > 0 or d.inflight > 0:
                continue
            idle_since = max(r.last_used_at or oldest, r.loaded_at or oldest)
            if idle_since <= now - timedelta(seconds=ttl):
                out.append(Unload(s.server_id, s.name, r.model, f"idle longer than {ttl:g} s"))
    return out


# ---------------------------------------------------------------------------------------------------
# One pass: every decision from one snapshot
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PassPlan:
    """What one pass decided, from one snapshot: loads (swaps and replicas), drains, unloads, and why
    each unplaced model still waits."""

    swaps: tuple[Swap, ...] = ()
    drains: tuple[tuple[int, str], ...] = ()      # (server id, model): stop new work, evict when idle
    replicas: tuple[Replica, ...] = ()
    unloads: tuple[Unload, ...] = ()
    waiting: Mapping[str, str] = field(default_factory=dict)   # unplaced model -> why no load now

    def __bool__(self) -> bool:
        return bool(self.swaps or self.drains or self.replicas or self.unloads)


def _after_load(view: ServerView, model: str, size_bytes: int, evict: Sequence[str], now: datetime) -> ServerView:
    """The view as it will be once `model` is loading there and `evict` are gone."""
    import dataclasses

    kept = tuple(r for r in view.residents if r.model not in evict)
    return dataclasses.replace(view, residents=kept + (Resident(model, size_bytes, view.expected_parallel,
                                                                "loading", loaded_at=now, last_used_at=now),))


def _with_drains(view: ServerView, drain: Sequence[str]) -> ServerView:
    import dataclasses

    return dataclasses.replace(view, residents=tuple(
        dataclasses.replace(r, state="unloading") if r.model in drain else r for r in view.residents))


def plan_pass(servers: Sequence[ServerView], demand: Mapping[str, ModelDemand], *, unplaced: Sequence[str],
              sizes: Mapping[str, int], slots_by_model: Mapping[str, int], now: datetime, policy: Policy,
              replicas: bool = True, unloads: bool = True) -> PassPlan:
    """Every demand decision of one pass, from one snapshot, so no two decisions undo each other.

    Unplaced models go first, the starving ones by their oldest job's wait (longest first), then the
    others in the order given (their best-ranked job). Each decision is applied to the views before the
    next is made, and a server takes at most one swap per pass. Then replicas for the models whose queue
    outgrows their slots, then idle and surplus unloads of what no decision touched.
    """
    views = {v.server_id: v for v in servers}
    swapped: set[int] = set()
    touched: set[tuple[int, str]] = set()
    swaps, drains, reps, outs = [], [], [], []
    waiting: dict[str, str] = {}
    order = sorted(enumerate(unplaced), key=lambda e: (
        not demand.get(e[1], ModelDemand(e[1])).starved(policy),
        -demand.get(e[1], ModelDemand(e[1])).oldest_wait_s if demand.get(e[1], ModelDemand(e[1])).starved(policy) else 0,
        e[0]))
    for _, model in order:
        d = demand.get(model, ModelDemand(model))
        size = int(sizes.get(model) or 0)
        candidates = [v for sid, v in views.items() if sid not in swapped]
        swap = swap_for(candidates, d, demand, now=now, policy=policy, size_bytes=size)
        if swap is None:
            refused = choose_server(candidates, model, size, now=now, min_residency_s=policy.residency_cap_s)
            ever = [v for v in candidates if v.can_load and model not in v.blocked
                    and _room(v, size, list(v.residents)) is not None]
            if not ever:
                waiting[model] = f"no server can load {model!r}: {refused}"
            elif d.starved(policy):
                waiting[model] = "due, but every resident that could make room has jobs waiting longer"
            else:
                why = (f"no ordinary swap ({refused})" if isinstance(refused, Refusal)
                       else f"not worth a swap yet (load ~{d.load(policy):.0f} s)")
                # No changing figures: the note is written on every queued job only when it changes.
                waiting[model] = f"{why}; wins one once its oldest job has waited {policy.aging_s:g} s"
            continue
        if swap.drain:
            drains.extend((swap.server_id, m) for m in swap.drain)
            touched.update((swap.server_id, m) for m in swap.drain)
            views[swap.server_id] = _with_drains(views[swap.server_id], swap.drain)
            waiting[model] = (f"due: {', '.join(swap.drain)} on {swap.server} finish their requests in flight, "
                              f"then make room")
        else:
            swaps.append(swap)
            touched.update((swap.server_id, m) for m in swap.evict)
            touched.add((swap.server_id, model))
            views[swap.server_id] = _after_load(views[swap.server_id], model, size, swap.evict, now)
        if swap.evict or swap.drain:
            swapped.add(swap.server_id)

    if replicas:
        hot = sorted((d for d in demand.values() if d.queued > 0 and d.model not in unplaced),
                     key=lambda d: (-d.queued, d.model))
        for d in hot:
            size = int(sizes.get(d.model) or next((r.size_bytes for v in views.values()
                                                   if (r := v.holds(d.model)) is not None), 0))
            rep = replica_for(list(views.values()), d, int(slots_by_model.get(d.model, 0)), now=now, policy=policy,
                              size_bytes=size, demand=demand)
            if rep is None:
                continue
            reps.append(rep)
            touched.add((rep.server_id, d.model))
            views[rep.server_id] = _after_load(views[rep.server_id], d.model, size, (), now)

    if unloads:
        for u in surplus_replicas(servers, demand, now=now, policy=policy) + idle_unloads(servers, demand, now=now,
                                                                                         policy=policy):
            key = (u.server_id, u.model)
            if key not in touched:
                touched.add(key)
                outs.append(u)
    return PassPlan(tuple(swaps), tuple(drains), tuple(reps), tuple(outs), waiting)


def stranded(servers: Sequence[ServerView], demand: Mapping[str, ModelDemand],
             slots_by_model: Mapping[str, int]) -> list[str]:
    """Idle capacity beside a backlog (what the demo counts): a usable server with nothing in flight and
    no load running (idle) and room for a model without evicting anything, while at least 2 × that
    model's slots (at least one job) of its jobs wait and no load of it is under way. Each entry names
    the server and the model."""
    out = []
    for d in sorted(demand.values(), key=lambda d: d.model):
        if d.queued < max(1, 2 * int(slots_by_model.get(d.model, 0))):
            continue
        if any((r := v.holds(d.model)) is not None and r.state == "loading" for v in servers):
            continue
        size = next((r.size_bytes for v in servers if (r := v.holds(d.model)) is not None), 0)
        for s in servers:
            if not s.can_load or s.held or s.holds(d.model) is not None or d.model in s.blocked \
                    or any(r.state == "loading" for r in s.residents):
                continue
            if _room(s, size, []) == ():
                out.append(f"{s.name} idle while {d.queued} {d.model} job(s) wait")
    return out
