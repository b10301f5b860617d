"""`GET /metrics`: the operator views as Prometheus metrics, through `prometheus_client`.

Everything is read from Postgres at scrape time by a custom collector, so any `aibot serve` instance
reports the whole cluster and no process keeps counters that a restart would reset. Durations are
summaries over the jobs finished in the last `WINDOW_MINUTES` (the view's window), not process-lifetime
totals. The exposition format (escaping, `_total` on counters, the TYPE/HELP lines) is the library's.

Each function decorated with `@families` reads one view and returns its metric families; the decorator
is what puts it on the scrape, so a metric exists exactly where it is written. All of them run in one
transaction per scrape, so they agree on `now()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from starlette.responses import Response

from aibot import db
from aibot.ops import inspection
from aibot.settings import get_settings

WINDOW_MINUTES = 60
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4   # what Prometheus negotiates by default; the format generate_latest writes
# The roles that register in `aibot.workers` (aibot.worker.registry): Dramatiq workers, `aibot bot`,
# the scheduler (on its own or inside the bot).
ROLES = ("worker", "bot", "scheduler")

Reader = Callable[[psycopg.Connection], Iterable[Metric]]
READERS: list[Reader] = []


def families(fn: Reader) -> Reader:
    """Registers a reader of metric families on every scrape."""
    READERS.append(fn)
    return fn


@families
def queue_depth(conn) -> Iterator[Metric]:
    depth = GaugeMetricFamily("aibot_jobs", "Jobs by state and priority band (critical<=10, high<=30, medium<=60, "
                                            "low<=90, background).", labels=["state", "band"])
    seen = set()
    for r in inspection.queue_depth(conn):
        depth.add_metric([r["state"], r["band"]], r["jobs"])
        seen.add((r["state"], r["band"]))
    for band in inspection.BANDS:  # keep the live bands present at 0 so rate/alerts see them drop
        for state in ("queued", "running"):
            if (state, band) not in seen:
                depth.add_metric([state, band], 0)
    yield depth


@families
def queue_oldest(conn) -> Iterator[Metric]:
    oldest = inspection.queue_oldest(conn)
    yield GaugeMetricFamily("aibot_queue_oldest_wait_seconds", "Age of the oldest queued job (0 when the queue is empty).",
                            value=oldest.get("oldest_wait_seconds") or 0)
    yield GaugeMetricFamily("aibot_queue_runnable", "Queued jobs whose available_at has passed.",
                            value=oldest.get("runnable") or 0)


@families
def slots(conn) -> Iterator[Metric]:
    inflight = GaugeMetricFamily("aibot_inflight", "Requests in flight per (server, model).", labels=["server", "model"])
    total = GaugeMetricFamily("aibot_slots", "Slots (allowed concurrent requests) per (server, model).",
                              labels=["server", "model"])
    for r in inspection.slot_usage(conn):
        inflight.add_metric([r["server"], r["model"]], r["slots_used"])
        total.add_metric([r["server"], r["model"]], r["slots_total"])
    yield inflight
    yield total


@families
def servers(conn) -> Iterator[Metric]:
    def gauge(name: str, help_text: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_text, labels=["server"])

    failures = gauge("aibot_server_failures", "Consecutive server faults seen by all workers.")
    backoff = gauge("aibot_server_backoff_level", "Exponential backoff level of the server.")
    up = gauge("aibot_server_up", "1 when the server is healthy, enabled, not draining and not backed off.")
    draining = gauge("aibot_server_draining", "1 while an operator drains the server.")
    memory = gauge("aibot_server_memory_bytes", "Memory budget of the server (RAM).")
    accounted = gauge("aibot_server_accounted_bytes", "Loaded models + in-flight buffers + reserve + safety margin "
                                                      "(the server_health view's accounted_bytes).")
    for r in inspection.server_health(conn):
        name = [r["name"]]
        failures.add_metric(name, r["failure_count"])
        backoff.add_metric(name, r["backoff_level"])
        up.add_metric(name, 1 if r["status"] == "healthy" else 0)
        draining.add_metric(name, 1 if r["draining"] else 0)
        if r["memory_bytes"] is not None:
            memory.add_metric(name, r["memory_bytes"])
        if r["accounted_bytes"] is not None:
            accounted.add_metric(name, r["accounted_bytes"])
    yield from (failures, backoff, up, draining, memory, accounted)


@families
def throughput(conn) -> Iterator[Metric]:
    rpm = GaugeMetricFamily("aibot_replies_per_minute", "Replies delivered per minute, averaged over the window.",
                            labels=["window"])
    wait = GaugeMetricFamily("aibot_job_wait_seconds", "Wait (claim - enqueue) percentiles of finished jobs over the "
                                                       "window.", labels=["window", "quantile"])
    for r in inspection.throughput(conn):
        w = f"{r['window_minutes']}m"
        if r["replies_per_minute"] is not None:
            rpm.add_metric([w], r["replies_per_minute"])
        for q, key in (("0.5", "p50_wait_seconds"), ("0.95", "p95_wait_seconds")):
            if r[key] is not None:
                wait.add_metric([w, q], r[key])
    yield rpm
    yield wait


@families
def durations(conn) -> Iterator[Metric]:
    """Summaries with quantiles, which prometheus_client's SummaryMetricFamily does not take: the samples
    are added to a plain `Metric` of type summary, as its exposition expects them."""
    run = Metric("aibot_job_duration_seconds",
                 f"Claim-to-finish time of jobs finished in the last {WINDOW_MINUTES} minutes.", "summary")
    latency = Metric("aibot_job_latency_seconds",
                     f"Message-to-reply time of jobs finished in the last {WINDOW_MINUTES} minutes.", "summary")
    for r in inspection.job_durations(conn, WINDOW_MINUTES):
        q = _quantile(r["quantile"])
        if r["run_seconds"] is not None:
            run.add_sample(run.name, {"quantile": q}, float(r["run_seconds"]))
        if r["latency_seconds"] is not None:
            latency.add_sample(latency.name, {"quantile": q}, float(r["latency_seconds"]))
    totals = inspection.job_duration_totals(conn, WINDOW_MINUTES)
    for m, total in ((run, totals["run_sum"]), (latency, totals["latency_sum"])):
        if total is not None:
            m.add_sample(m.name + "_sum", {}, float(total))
        if totals["count"] is not None:
            m.add_sample(m.name + "_count", {}, float(totals["count"]))
    yield run
    yield latency


def _quantile(value) -> str:
    v = float(value)
    return str(int(v)) if v.is_integer() else repr(v)


@families
def model_loads(conn) -> Iterator[Metric]:
    loads = CounterMetricFamily("aibot_model_loads", "Model loads and unloads recorded in model_loads.",
                                labels=["server", "model", "action", "outcome"])
    for r in inspection.model_loads(conn):
        loads.add_metric([r["server"], r["model"], r["action"], r["outcome"]], r["n"])
    yield loads


@families
def model_queue(conn) -> Iterator[Metric]:
    queued = GaugeMetricFamily("aibot_model_queued", "Queued jobs per model.", labels=["model"])
    replicas = GaugeMetricFamily("aibot_model_replicas", "Usable servers holding the model loaded.", labels=["model"])
    stuck = GaugeMetricFamily("aibot_model_unservable", "1 when the model has queued jobs and no server holds it "
                                                        "or is loading it (aibot status says why).", labels=["model"])
    for r in inspection.model_queue(conn):
        queued.add_metric([r["model"]], r["queued"])
        replicas.add_metric([r["model"]], r["replicas"])
        stuck.add_metric([r["model"]], int(bool(r["queued"] and not r["served_by"] and not r["loading_on"])))
    yield from (queued, replicas, stuck)


@families
def workers(conn) -> Iterator[Metric]:
    fresh_seconds = get_settings().heartbeat_fresh_seconds()   # the one rule (aibot.settings)
    live = GaugeMetricFamily("aibot_workers", f"Registered processes by role with a heartbeat in the last "
                                              f"{fresh_seconds:.0f} s, one lease (0 for a role whose processes all went "
                                              "silent, so an alert sees it drop).", labels=["role"])
    by_role: dict[str, int] = dict.fromkeys(ROLES, 0)   # a sample per role even before any process registers
    for r in inspection.worker_status(conn):
        age = r["heartbeat_age_seconds"]
        fresh = age is not None and age < fresh_seconds
        by_role[r["role"]] = by_role.get(r["role"], 0) + fresh
    for role, n in sorted(by_role.items()):
        live.add_metric([role], n)
    yield live


class ViewCollector(Collector):
    """Runs every registered reader in one read transaction of `database` per scrape."""

    def __init__(self, database: db.Database, readers: list[Reader] = READERS):
        self.database = database
        self.readers = readers

    def collect(self) -> Iterator[Metric]:
        with self.database.transaction() as conn, conn.transaction():
            found = [m for read in self.readers for m in read(conn)]
        yield from found


def registry(database: db.Database) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ViewCollector(database))
    return reg


def exposition(database: db.Database) -> bytes:
    return generate_latest(registry(database))


def response(database: db.Database) -> Response:
    return Response(exposition(database), media_type=CONTENT_TYPE)
