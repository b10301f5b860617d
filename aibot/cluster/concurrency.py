"""Pure adaptive concurrency: how many requests one (server, model) pair is worth running at once.

A server's `parallel` is how many requests it *accepts* at once, not how many make it faster. With
continuous batching (llama.cpp `--parallel N`, LM Studio's parallel predictions, vLLM) the concurrent
requests share one forward pass, so aggregate tokens/s grows with the batch while the GPU/ANE has
spare compute and then flattens: each added request just slows the others down (llama.cpp
tools/server/README.md: `-np, --parallel` "number of server slots", `-cb` continuous batching shares
the compute of one decode between the slots). Past that knee another slot buys no throughput; it only
makes every reply on the pair slower and holds a request buffer another model could use.

From aibot's own timings (a job's generation interval and its reply's size, `Sample`), this module
builds the curve aggregate tokens/s against in-flight requests per level (`curve`) and picks the knee
(`knee`): the smallest level beyond which one more request adds less than `min_gain` of what a lone
request produces. Levels are measured only when they are tried, so a pair whose curve is not known at
both ends (a lone request and its full `parallel`) keeps its full `parallel` -- that is the exploration
that measures it -- except that a pair whose `parallel` is measured and a lone request not runs one
request at a time until it is (a backlog never leaves a request alone). No I/O: `aibot.cluster.slots`
reads the samples and applies the caps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: One more request must add at least this fraction of a lone request's tokens/s to be worth a slot.
#: Measured against the single-request rate, not the current total, so a linear curve is never capped
#: (a relative "+10 % over the total" would cap a perfectly linear server at 10).
DEFAULT_MIN_GAIN = 0.10
#: A pair already capped keeps its cap until a higher level beats it by this many times the bar: a
#: hysteresis band, so a curve whose gain sits near `min_gain` does not flip between the cap and its full
#: parallel at every rebalance (it did, 4 → 1 → 4 → 1 within one run, on a real llama.cpp server).
KEEP_FACTOR = 1.5
#: Generations needed at a level before its throughput is trusted.
DEFAULT_MIN_SAMPLES = 8
#: A generation shorter than this is timer noise, not a throughput measurement.
MIN_SAMPLE_SECONDS = 1e-4


@dataclass(frozen=True)
class Sample:
    """One finished generation on a pair: how many requests were in flight on the pair during it
    (time-weighted, itself included), what it produced and how long it took."""

    concurrency: float
    tokens: float
    seconds: float


@dataclass(frozen=True)
class Level:
    """The pair's measured throughput with `k` requests in flight."""

    k: int
    samples: int
    per_request_tps: float     # Σ tokens / Σ seconds of the generations at this level
    in_flight: float = 0.0     # their time-weighted mean concurrency (0: use k)

    @property
    def x(self) -> float:
        """How many requests really ran at once at this level. Between one request and the next a
        worker stores, completes and claims, so k users keep slightly fewer than k in flight; using k
        itself would make the curve look flatter than it is."""
        return self.in_flight or float(self.k)

    @property
    def aggregate_tps(self) -> float:
        """x requests each at the per-request rate: the pair's total tokens/s at this level."""
        return self.x * self.per_request_tps


def level_of(concurrency: float) -> int:
    """The integer level a time-weighted concurrency belongs to (nearest, at least 1)."""
    return max(1, int(concurrency + 0.5))


def curve(samples: Iterable[Sample]) -> dict[int, Level]:
    """Aggregate throughput per in-flight level. Per level the rate is Σ tokens / Σ seconds, so a long
    generation weighs by its length and a few very short ones cannot dominate."""
    tokens: dict[int, float] = {}
    seconds: dict[int, float] = {}
    weighted: dict[int, float] = {}
    counts: dict[int, int] = {}
    for s in samples:
        if s.seconds < MIN_SAMPLE_SECONDS or s.tokens <= 0 or s.concurrency <= 0:
            continue
        k = level_of(s.concurrency)
        tokens[k] = tokens.get(k, 0.0) + s.tokens
        seconds[k] = seconds.get(k, 0.0) + s.seconds
        weighted[k] = weighted.get(k, 0.0) + s.concurrency * s.seconds
        counts[k] = counts.get(k, 0) + 1
    return {k: Level(k, counts[k], tokens[k] / seconds[k], weighted[k] / seconds[k]) for k in sorted(counts)}


@dataclass(frozen=True)
class Decision:
    """The slots a pair is worth and why (shown in logs and `aibot plan`)."""

    slots: int
    reason: str
    measured: tuple[int, ...] = ()   # the levels with enough samples to count


def knee(levels: Mapping[int, Level], parallel: int, *, min_gain: float = DEFAULT_MIN_GAIN,
         min_samples: int = DEFAULT_MIN_SAMPLES, current: int | None = None) -> Decision:
    """The pair's concurrency: the knee of its throughput curve, or `parallel` while it is not known.

    Levels with `min_samples` generations are measured. A cap needs both ends of the curve: a lone
    request (the gain is judged against its rate) and `parallel` itself (what running every slot
    gives); until `parallel` is measured the pair keeps it, so traffic measures it, and once it is but
    a lone request is not (a backlog never leaves one alone) the pair probes at 1 until it is. Then the knee
    is the smallest measured c < parallel such that every measured c' above it adds less than
    `min_gain` × the lone-request throughput per added request:
    T(c') − T(c) < min_gain · T(1) · (x(c') − x(c)), x being the requests really in flight at each
    level (`Level.x`). Why `parallel` must be measured: a real llama.cpp server on CPU was flat from
    1 to 3 requests and 1.6 × faster at 6 (bench/adaptive_real.py); deciding from the levels 1 and 2
    alone capped it at 1 and cost a third of its throughput. Comparing against every higher level, not
    only c + 1, keeps one noisy dip from settling a pair that grows again past it.
    `current`, the pair's cap now: kept while no measured level above it adds `KEEP_FACTOR` × the bar,
    even if a lower level has become a knee too. A capped pair keeps adding samples at its cap only,
    which moves that level's estimate; without this a real server's cap went 4 → 8 → 4 → 5 within one
    backlog, and between 1 and its full parallel on a curve near the bar (bench/adaptive_real.py).
    Never above `parallel` (the server accepts no more); the memory bound is applied by the caller.
    """
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain!r}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples!r}")
    if parallel == 1:
        return Decision(1, "parallel 1: nothing to adapt")
    measured = tuple(k for k in range(1, parallel + 1) if k in levels and levels[k].samples >= min_samples)
    for need in (1, parallel):
        if need not in measured:
            have = levels[need].samples if need in levels else 0
            known = f"; measured at {', '.join(map(str, measured))}" if measured else ""
            if need == 1 and parallel in measured:
                # A backlog keeps every slot busy, so a lone request never happens by itself: run one
                # to measure it (on real 1-thread llama.cpp servers one request each was 1.3-1.5 × as
                # fast as two, bench/results/real_inference.json; nothing but a probe finds that out).
                return Decision(1, f"probing: {have}/{min_samples} samples at 1 in flight, its full "
                                   f"{parallel} measured{known}", measured)
            return Decision(parallel, f"exploring: {have}/{min_samples} samples at {need} in flight{known}", measured)
    t = {k: levels[k].aggregate_tps for k in measured}
    x = {k: levels[k].x for k in measured}
    step = min_gain * t[1]

    def is_knee(c: int, bar: float = step) -> bool:
        return all(t[c2] - t[c] < bar * max(x[c2] - x[c], 0.0) for c2 in measured if c2 > c)

    def decided(c: int) -> Decision:
        return Decision(c, f"knee at {c}: {t[c]:.1f} tok/s, at most {max(t.values()):.1f} at "
                           f"{', '.join(map(str, measured))} in flight (< {min_gain:.0%} of a lone "
                           f"request's {t[1]:.1f} per added request)", measured)

    if current in measured[:-1] and is_knee(current, KEEP_FACTOR * step):
        return decided(current)
    for c in measured[:-1]:
        if is_knee(c):
            return decided(c)
    return Decision(parallel, f"throughput grows up to parallel {parallel}", measured)


def caps(samples: Mapping[str, Iterable[Sample]], parallel: Mapping[str, int], *,
         min_gain: float = DEFAULT_MIN_GAIN, min_samples: int = DEFAULT_MIN_SAMPLES,
         current: Mapping[str, int] | None = None) -> dict[str, Decision]:
    """The decision for each model of one server (`parallel`: model → its parallel; `current`: model →
    its slots now); a model with no samples at all explores at its parallel."""
    current = current or {}
    return {m: knee(curve(samples.get(m, ())), p, min_gain=min_gain, min_samples=min_samples,
                    current=current.get(m))
            for m, p in parallel.items()}
