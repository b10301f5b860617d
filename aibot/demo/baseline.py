"""What the same workload would have cost the original bot: one sequential worker on one LM Studio.

The original ran one worker loop (`maxConcurrentWorkers` 1) that claimed the highest-priority message
(then the oldest), sent one chat completion to one hard-coded server and waited for it; LM Studio
answered one request at a time and JIT-loaded the entity's model when it was not loaded
(docs/demo.md, /work/shared/reference/original-bot.md §1.3, §4.4, §4.6).

Rather than run that for minutes, the demo replays it as a discrete-event simulation over the same
recording: each message arrives when it was posted; its service time is what the simulator takes for
that reply at concurrency 1 (time to first token + prompt tokens + reply tokens, from the simulator's
own timing constants and `speed`); a model load costs the simulator's load time (size × s/GB +
overhead). Two load policies bound the original:
- `switch`: LM Studio's default JIT auto-evict keeps one JIT-loaded model, so every model switch
  loads (how the original ran on default settings);
- `warm`: every model stays loaded after its first use (the most favourable reading).
Everything here is pure.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from aibot.sim.engine import load_seconds
from aibot.sim.replies import count_tokens, prompt_tokens

POLICIES = ("switch", "warm")


@dataclass(frozen=True)
class Timing:
    """The simulator's timing constants (SimConfig fields) that a reply at concurrency 1 depends on."""

    ttft_seconds: float
    prompt_token_seconds: float
    per_token_seconds: float
    seconds_per_gb: float
    load_overhead_seconds: float
    speed: float

    @classmethod
    def from_sim_config(cls, cfg) -> Timing:
        return cls(cfg.ttft_seconds, cfg.prompt_token_seconds, cfg.per_token_seconds, cfg.seconds_per_gb,
                   cfg.load_overhead_seconds, cfg.speed)

    def service_seconds(self, prompt_tokens: int, completion_tokens: int) -> float:
        """One generation alone on the server (batch multiplier 1)."""
        return (self.ttft_seconds + prompt_tokens * self.prompt_token_seconds
                + completion_tokens * self.per_token_seconds) * self.speed

    def load_seconds(self, size_bytes: int) -> float:
        return load_seconds(size_bytes, self.seconds_per_gb, self.load_overhead_seconds, self.speed)


def original_prompt_tokens(system_prompt: str, user_prompt: str, context: Sequence[str], username: str,
                           text: str) -> int:
    """Prompt size of the original's request: one message, systemPrompt + userPrompt + "Context:" with
    the context lines and the triggering "<username>: <text>" line (original-bot.md §1.3, §4.6)."""
    context_text = "\n".join([*context, f"{username}: {text}"])
    return prompt_tokens([{"content": f"{system_prompt}{user_prompt}\n\nContext: {context_text}"}])


def reply_tokens(text: str) -> int:
    return count_tokens(text)


@dataclass(frozen=True)
class SeqJob:
    arrival: float          # seconds (any origin; the same for every job)
    priority: int
    model: str
    service: float          # seconds at concurrency 1


@dataclass(frozen=True)
class SequentialRun:
    policy: str
    makespan: float          # last finish − first arrival
    loads: int
    load_seconds: float      # time spent loading
    service_seconds: float   # time spent generating
    waits: tuple[float, ...]  # start of service (after any load) − arrival, per job in input order


def simulate_sequential(jobs: Sequence[SeqJob], load_time: Mapping[str, float], *, policy: str = "switch",
                        initially_loaded: Iterable[str] = ()) -> SequentialRun:
    """One worker, one request at a time, highest priority (lowest number) first, then oldest."""
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if not jobs:
        return SequentialRun(policy, 0.0, 0, 0.0, 0.0, ())
    missing = sorted({j.model for j in jobs} - set(load_time))
    if missing:
        raise ValueError(f"load_time: no load time for model(s) {', '.join(missing)}")
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].arrival, i))
    start = jobs[order[0]].arrival
    t = start
    loaded: list[str] = list(initially_loaded)
    ready: list[tuple[int, float, int]] = []
    waits = [0.0] * len(jobs)
    nxt = loads = 0
    spent_loading = spent_serving = 0.0
    done = 0
    while done < len(jobs):
        while nxt < len(order) and jobs[order[nxt]].arrival <= t:
            i = order[nxt]
            heapq.heappush(ready, (jobs[i].priority, jobs[i].arrival, i))
            nxt += 1
        if not ready:
            t = jobs[order[nxt]].arrival
            continue
        _, _, i = heapq.heappop(ready)
        job = jobs[i]
        if job.model not in loaded:
            t += load_time[job.model]
            spent_loading += load_time[job.model]
            loads += 1
            loaded = [job.model] if policy == "switch" else [*loaded, job.model]
        waits[i] = t - job.arrival
        t += job.service
        spent_serving += job.service
        done += 1
    return SequentialRun(policy, t - start, loads, spent_loading, spent_serving, tuple(waits))
