"""Synthetic chat users: a seeded, Poisson-ish stream of human messages to several entities.

The plan is computed up front from the seed (pure), so `--seed` repeats the same workload exactly and
the report's baseline can be computed from what was actually posted. A `Poster` thread then posts the
plan to the fake chat server at the planned times, the way the frontend would.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aibot.harness import entity

# (id, model, default priority, popularity weight). Uneven popularity makes the model mix realistic:
# some models are hot, one is rarely asked for, so placement and loads have something to decide.
DEMO_ENTITIES: tuple[tuple[str, str, int, float], ...] = (
    ("the-eternal", "sim/model-1@f16", 40, 6.0),
    ("sage", "sim/model-2@f16", 50, 4.0),
    ("jester", "sim/model-3@f16", 60, 3.0),
    ("oracle", "sim/model-4@f16", 30, 2.0),
    ("poet", "sim/model-5@f16", 50, 1.5),
    ("hermit", "sim/model-6@f16", 70, 0.5),
)

USERNAMES = ("ada", "bao", "cleo", "dmitri", "esme", "farid", "gus", "hana", "ivo", "juno", "kai", "lena")
AIS_NAMES = ("Echo", "Muse", "Nova", "Quill", "Rune", "Sol")
OPENERS = ("what do you think about", "tell me a story about", "is it true that", "explain", "why does",
           "how would you describe", "any advice on", "remember")
TOPICS = ("the sea at night", "old maps", "rain on tin roofs", "the first computer", "tea", "mountains",
          "lost keys", "city lights", "a quiet library", "the speed of light", "bread", "winter birds")

# Priority mix of the synthetic users: most messages carry none (the entity's default applies).
PRIORITY_MIX: tuple[tuple[int | None, float], ...] = ((None, 0.6), (5, 0.15), (20, 0.15), (80, 0.10))

DEFAULT_RATE_PER_SECOND = 2.5   # messages per simulated second when --messages is not given


class WorkloadError(ValueError):
    """Bad workload parameters; the message names the option."""


@dataclass(frozen=True)
class PlannedMessage:
    at: float                     # simulated seconds after posting starts
    entity: str
    text: str
    username: str
    color: str
    priority: int | None          # botParams.priority, None = the entity's default
    ais: str | None               # botParams.ais identity override
    context: tuple[str, ...] | None


def demo_entity_configs() -> list[dict]:
    """The demo's entities in the original config format; maxTokens leaves the simulator's ~110-token
    (≈ 3 s) replies intact. `rateLimits: {}` says on purpose that synthetic users are not throttled (a
    missing key is a config warning, logged by every worker process)."""
    return [entity(eid, model, priority=prio, rate_limits={}, maxTokens=200, userPrompt="Reply in a few sentences.")
            for eid, model, prio, _ in DEMO_ENTITIES]


def entity_models() -> dict[str, str]:
    return {eid: model for eid, model, _, _ in DEMO_ENTITIES}


def message_count(messages: int | None, duration: float) -> int:
    """`--messages` if given, else the default rate over the posting window."""
    if duration <= 0:
        raise WorkloadError(f"--duration must be > 0 seconds, got {duration!r}")
    if messages is None:
        return max(1, round(DEFAULT_RATE_PER_SECOND * duration))
    if messages < 1:
        raise WorkloadError(f"--messages must be >= 1, got {messages!r}")
    return messages


def arrival_times(rng: random.Random, count: int, duration: float) -> list[float]:
    """`count` arrivals of a Poisson process conditioned on `count` events in [0, duration): sorted
    uniform times, so exponential-looking gaps and bursts, and exactly the requested total."""
    return sorted(rng.uniform(0.0, duration) for _ in range(count))


def _weighted(rng: random.Random, options: Sequence[tuple[object, float]]) -> object:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def plan_messages(seed: int, count: int, duration: float,
                  entities: Sequence[tuple[str, str, int, float]] = DEMO_ENTITIES) -> list[PlannedMessage]:
    """The whole workload, deterministic for a seed. About half the messages send the last lines of the
    room as context (what the frontend shows), ~15 % set an `ais` identity, some carry a priority."""
    rng = random.Random(seed)
    users = {u: f"{rng.randrange(256):03d}{rng.randrange(256):03d}{rng.randrange(256):03d}" for u in USERNAMES}
    room: list[str] = []
    plan = []
    for i, at in enumerate(arrival_times(rng, count, duration)):
        eid = rng.choices([e[0] for e in entities], weights=[e[3] for e in entities])[0]
        user = rng.choice(USERNAMES)
        text = f"{rng.choice(OPENERS)} {rng.choice(TOPICS)}? (#{i + 1})"
        priority = _weighted(rng, PRIORITY_MIX)
        roll = rng.random()
        if roll < 0.10:
            ais = f"{rng.choice(AIS_NAMES)}:{rng.randrange(256):03d}{rng.randrange(256):03d}{rng.randrange(256):03d}"
        elif roll < 0.15:
            ais = f"{rng.choice(AIS_NAMES)}:random"
        else:
            ais = None
        context = tuple(room[-rng.randint(1, 8):]) if room and rng.random() < 0.5 else None
        plan.append(PlannedMessage(at, eid, text, user, users[user], priority, ais, context))  # type: ignore[arg-type]
        room.append(f"{user}: {text}")
    return plan


@dataclass(frozen=True)
class PostedMessage:
    id: str
    entity: str
    priority: int | None
    timestamp_ms: int             # as stored by the chat server
    context_lines: int
    text: str


class Poster(threading.Thread):
    """Posts the plan in real time (`at × speed` seconds after `start()`); `stop` ends it early."""

    def __init__(self, plan: Sequence[PlannedMessage], post: Callable[..., dict], *, speed: float,
                 stop: threading.Event):
        super().__init__(name="demo-poster", daemon=True)
        self.plan = list(plan)
        self._post = post
        self.speed = speed
        self.stop_event = stop
        self._lock = threading.Lock()
        self._posted: list[PostedMessage] = []
        self.error: BaseException | None = None

    @property
    def posted(self) -> list[PostedMessage]:
        with self._lock:
            return list(self._posted)

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            for m in self.plan:
                # Waiting for a scheduled wall-clock time is the workload itself, not synchronisation.
                if self.stop_event.wait(max(0.0, t0 + m.at * self.speed - time.monotonic())):
                    return
                stored = self._post(m.text, entity=m.entity, priority=m.priority, ais=m.ais,
                                    context=list(m.context) if m.context is not None else None,
                                    username=m.username, color=m.color)
                with self._lock:
                    self._posted.append(PostedMessage(str(stored["id"]), m.entity, m.priority,
                                                      int(stored["timestamp"]), len(m.context or ()), m.text))
        except BaseException as exc:  # noqa: BLE001 - reported by the orchestrator
            self.error = exc
