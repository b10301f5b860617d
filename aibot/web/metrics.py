"""Prometheus text exposition (format 0.0.4) of the operator views, for `GET /metrics`.

Everything is read from Postgres at scrape time, so any `aibot serve` instance reports the whole
cluster and no process keeps counters that a restart would reset. Durations are summaries over the
jobs finished in the last `WINDOW_MINUTES` (the view's window), not process-lifetime totals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from aibot import db, inspection

WINDOW_MINUTES = 60
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metric:
    name: str
    kind: str  # gauge | counter | summary
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | int | None, suffix: str = "", **labels: object) -> None:
        if value is None:
            return
        self.samples.append((self.name + suffix, {k: str(v) for k, v in labels.items()}, float(value)))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for name, labels, value in m.samples:
            lab = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {format_value(value)}" if lab else f"{name} {format_value(value)}")
    return "\n".join(lines) + "\n"


def collect(conn: psycopg.Connection) -> list[Metric]:
    with conn.transaction():
        return _collect(conn)


def _collect(conn: psycopg.Connection) -> list[Metric]:
    depth = Metric("aibot_jobs", "gauge", "Jobs by state and priority band (critical<=10, high<=30, medium<=60, low<=90, background).")
    seen = set()
    for r in inspection.queue_depth(conn):
        depth.add(r["jobs"], state=r["state"], band=r["band"])
        seen.add((r["state"], r["band"]))
    for band in inspection.BANDS:  # keep the live bands present at 0 so rate/alerts see them drop
        for state in ("queued", "running"):
            if (state, band) not in seen:
                depth.add(0, state=state, band=band)

    oldest = inspection.queue_oldest(conn)
    age = Metric("aibot_queue_oldest_wait_seconds", "gauge", "Age of the oldest queued job (0 when the queue is empty).")
    age.add(oldest.get("oldest_wait_seconds") or 0)
    runnable = Metric("aibot_queue_runnable", "gauge", "Queued jobs whose available_at has passed.")
    runnable.add(oldest.get("runnable") or 0)

    inflight = Metric("aibot_inflight", "gauge", "Requests in flight per (server, model).")
    slots = Metric("aibot_slots", "gauge", "Slots (allowed concurrent requests) per (server, model).")
    for r in inspection.slot_usage(conn):
        inflight.add(r["slots_used"], server=r["server"], model=r["model"])
        slots.add(r["slots_total"], server=r["server"], model=r["model"])

    failures = Metric("aibot_server_failures", "gauge", "Consecutive server faults seen by all workers.")
    backoff = Metric("aibot_server_backoff_level", "gauge", "Exponential backoff level of the server.")
    up = Metric("aibot_server_up", "gauge", "1 when the server is healthy, enabled, not draining and not backed off.")
    draining = Metric("aibot_server_draining", "gauge", "1 while an operator drains the server.")
    mem = Metric("aibot_server_memory_bytes", "gauge", "Memory budget of the server (RAM).")
    acc = Metric("aibot_server_accounted_bytes", "gauge", "Loaded models + in-flight buffers + reserve + safety margin.")
    for r in inspection.server_health(conn):
        failures.add(r["failure_count"], server=r["name"])
        backoff.add(r["backoff_level"], server=r["name"])
        up.add(1 if r["status"] == "healthy" else 0, server=r["name"])
        draining.add(1 if r["draining"] else 0, server=r["name"])
        mem.add(r["memory_bytes"], server=r["name"])
        acc.add(r["accounted_bytes"], server=r["name"])

    rpm = Metric("aibot_replies_per_minute", "gauge", "Replies delivered per minute, averaged over the window.")
    wait = Metric("aibot_job_wait_seconds", "gauge", "Wait (claim - enqueue) percentiles of finished jobs over the window.")
    for r in inspection.throughput(conn):
        w = f"{r['window_minutes']}m"
        rpm.add(r["replies_per_minute"], window=w)
        wait.add(r["p50_wait_seconds"], window=w, quantile="0.5")
        wait.add(r["p95_wait_seconds"], window=w, quantile="0.95")

    run = Metric("aibot_job_duration_seconds", "summary",
                 f"Claim-to-finish time of jobs finished in the last {WINDOW_MINUTES} minutes.")
    latency = Metric("aibot_job_latency_seconds", "summary",
                     f"Message-to-reply time of jobs finished in the last {WINDOW_MINUTES} minutes.")
    for r in db.all_rows(conn, "ops_job_durations", {"minutes": WINDOW_MINUTES}):
        run.add(r["run_seconds"], quantile=format_value(r["quantile"]))
        latency.add(r["latency_seconds"], quantile=format_value(r["quantile"]))
    totals = db.one(conn, "ops_job_durations_totals", {"minutes": WINDOW_MINUTES})
    run.add(totals["run_sum"], "_sum")
    run.add(totals["count"], "_count")
    latency.add(totals["latency_sum"], "_sum")
    latency.add(totals["count"], "_count")

    loads = Metric("aibot_model_loads_total", "counter", "Model loads and unloads recorded in model_loads.")
    for r in db.all_rows(conn, "ops_model_loads"):
        loads.add(r["n"], server=r["server"], model=r["model"], action=r["action"], outcome=r["outcome"])

    workers = Metric("aibot_workers", "gauge", "Registered processes by role with a heartbeat in the last 60 s.")
    by_role: dict[str, int] = {}
    for r in inspection.worker_status(conn):
        if r["heartbeat_age_seconds"] is not None and r["heartbeat_age_seconds"] < 60:
            by_role[r["role"]] = by_role.get(r["role"], 0) + 1
    for role, n in sorted(by_role.items()):
        workers.add(n, role=role)

    return [depth, age, runnable, inflight, slots, failures, backoff, up, draining, mem, acc, rpm, wait,
            run, latency, loads, workers]


def exposition(conn: psycopg.Connection) -> str:
    return render(collect(conn))


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader for tests and scripts: every line is a comment or `name{labels} value`."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        m = sample.match(line)
        if not m:
            raise ValueError(f"line {i}: not a Prometheus sample: {line!r}")
        name, labels_text, value = m.groups()
        labels: dict[str, str] = {}
        if labels_text:
            pos = 0
            for lm in label.finditer(labels_text):
                if lm.start() != pos:
                    raise ValueError(f"line {i}: bad labels {labels_text!r}")
                labels[lm.group(1)] = lm.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                pos = lm.end()
            if pos != len(labels_text):
                raise ValueError(f"line {i}: bad labels {labels_text!r}")
        out.setdefault(name, []).append((labels, float(value)))
    return out
