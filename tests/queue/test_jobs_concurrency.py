"""The queue's guarantees under real concurrency: many connections, threads and processes at once."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibot import db
from aibot.queue import jobs
from aibot.queue.policy import STRICT_PRIORITY_AGING

pytestmark = pytest.mark.timeout(180)

N_JOBS = 2000


def job(mid: str, *, priority: int = 50, entity: str = "e1") -> jobs.NewJob:
    return jobs.NewJob(source="chat", source_message_id=mid, entity_id=entity, model="m1", priority=priority)


def enqueue_range(conn, n: int) -> list[int]:
    ids: list[int] = []
    for start in range(0, n, 500):
        ids += jobs.enqueue_many(conn, [job(str(i), priority=i % 100) for i in range(start, min(n, start + 500))])
    return ids


def drain(url: str, worker: str) -> list[int]:
    """Claims and completes until nothing is claimable; returns the job ids this worker claimed."""
    got: list[int] = []
    with db.connect(url, autocommit=True) as conn:
        while (c := jobs.claim(conn, worker, lease_seconds=60, use_slots=False)) is not None:
            got.append(c.job_id)
            assert jobs.complete(conn, c.job_id, c.token), f"{worker} lost job {c.job_id} it had just claimed"
    return got


def drain_with_threads(url: str, prefix: str, threads: int) -> list[int]:
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda i: drain(url, f"{prefix}-t{i}"), range(threads)))
    return [jid for part in results for jid in part]


def process_main(args: tuple[str, int]) -> list[int]:
    """Entry point of a spawned process: several threads claiming at once."""
    url, index = args
    return drain_with_threads(url, f"p{index}", 4)


def assert_each_claimed_once(conn, claimed: list[int], ids: list[int]) -> None:
    dupes = [jid for jid, n in Counter(claimed).items() if n > 1]
    assert not dupes, f"claimed more than once: {dupes[:10]}"
    assert sorted(claimed) == sorted(ids)
    assert jobs.counts(conn) == {"done": len(ids)}
    attempts = conn.execute("SELECT max(attempts) AS hi, min(attempts) AS lo FROM aibot.jobs").fetchone()
    assert attempts == {"hi": 1, "lo": 1}


def test_16_threads_claim_each_job_exactly_once(db_url, conn):
    ids = enqueue_range(conn, N_JOBS)
    claimed = drain_with_threads(db_url, "w", 16)
    assert_each_claimed_once(conn, claimed, ids)


def test_4_processes_claim_each_job_exactly_once(db_url, conn):
    ids = enqueue_range(conn, N_JOBS)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        parts = pool.map(process_main, [(db_url, i) for i in range(4)])
    claimed = [jid for part in parts for jid in part]
    assert_each_claimed_once(conn, claimed, ids)
    workers = {r["worker_id"].split("-")[0] for r in conn.execute("SELECT DISTINCT worker_id FROM aibot.jobs")}
    assert len(workers) >= 2, f"expected work spread over processes, got {workers}"


def test_fenced_out_worker_changes_nothing(db_url, conn):
    [jid] = jobs.enqueue_many(conn, [job("a")])
    with db.connect(db_url, autocommit=True) as a_conn, db.connect(db_url, autocommit=True) as b_conn:
        a = jobs.claim(a_conn, "A", lease_seconds=60, use_slots=False)
        conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (jid,))
        assert jobs.reclaim_expired(conn) == 1
        b = jobs.claim(b_conn, "B", lease_seconds=60, use_slots=False)
        assert b.job_id == jid and b.token != a.token and b.attempts == 2

        assert not jobs.renew(a_conn, jid, a.token, 600)
        assert not jobs.store_reply(a_conn, jid, a.token, {"text": "from A"})
        assert not jobs.finish_delivered(a_conn, jid, a.token, {"text": "from A"}, started_at=None, generated_at=None)
        assert not jobs.complete(a_conn, jid, a.token)
        assert jobs.fail(a_conn, jid, a.token, "A gives up") is None
        assert not jobs.release(a_conn, jid, a.token)
        assert not jobs.reject(a_conn, jid, a.token, "A says no")
        r = jobs.get(conn, jid)
        assert (r["state"], r["worker_id"], r["claim_token"], r["reply"]) == ("running", "B", b.token, None)

        assert jobs.store_reply(b_conn, jid, b.token, {"text": "from B"})
        assert jobs.complete(b_conn, jid, b.token)
        assert not jobs.complete(a_conn, jid, a.token)
    r = jobs.get(conn, jid)
    assert (r["state"], r["reply"], r["worker_id"]) == ("done", {"text": "from B"}, "B")


def test_fencing_holds_when_completion_races_reclaim(db_url, conn):
    """Many expired claims; reclaim and the original holders' completions run at the same time.
    Every job ends either done by its holder or requeued, never both, and requeued ones are claimable."""
    ids = jobs.enqueue_many(conn, [job(str(i)) for i in range(200)])
    claims = jobs.claim_batch(conn, "A", 200, lease_seconds=60)
    conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 second'")
    start = threading.Barrier(2)

    def complete_all() -> set[int]:
        with db.connect(db_url, autocommit=True) as c:
            start.wait()
            return {cl.job_id for cl in claims if jobs.complete(c, cl.job_id, cl.token)}

    def reclaim() -> int:
        with db.connect(db_url, autocommit=True) as c:
            start.wait()
            return jobs.reclaim_expired(c)

    with ThreadPoolExecutor(2) as pool:
        done_f, reclaimed_f = pool.submit(complete_all), pool.submit(reclaim)
        done, reclaimed = done_f.result(), reclaimed_f.result()
    states = {r["id"]: r["state"] for r in conn.execute("SELECT id, state::text FROM aibot.jobs")}
    assert len(done) + reclaimed == len(ids)
    assert all(states[i] == "done" for i in done)
    assert all(states[i] == "queued" for i in set(ids) - done)


def test_sequential_claims_follow_priority_then_fifo(conn):
    specs = [("a", 5), ("b", 0), ("c", 5), ("d", 99), ("e", 0), ("f", 42)]
    first = jobs.enqueue_many(conn, [job(m, priority=p) for m, p in specs[:3]], aging_seconds=STRICT_PRIORITY_AGING)
    second = jobs.enqueue_many(conn, [job(m, priority=p) for m, p in specs[3:]], aging_seconds=STRICT_PRIORITY_AGING)
    by_id = dict(zip(first + second, specs))
    order = []
    while (c := jobs.claim(conn, "w", lease_seconds=60, use_slots=False)) is not None:
        order.append(by_id[c.job_id][0])
    assert order == ["b", "e", "a", "c", "f", "d"]


def backdate(conn, job_id: int, seconds: float, aging: float) -> None:
    """Makes a job look enqueued `seconds` ago (created_at and rank move together, as at insert)."""
    conn.execute("""UPDATE aibot.jobs
                    SET created_at = created_at - make_interval(secs => %(s)s),
                        rank = extract(epoch FROM created_at - make_interval(secs => %(s)s)) + priority * %(aging)s
                    WHERE id = %(id)s""", {"s": seconds, "aging": aging, "id": job_id})


def test_aging_lets_an_old_low_priority_job_overtake(conn):
    aging = 30.0
    old_low, old_lowest = jobs.enqueue_many(conn, [job("old-10", priority=10), job("old-50", priority=50)],
                                            aging_seconds=aging)
    backdate(conn, old_low, 600, aging)     # 600 s > (10 - 0) * 30 s: overtakes a fresh priority 0
    backdate(conn, old_lowest, 600, aging)  # 600 s < (50 - 0) * 30 s: does not
    [fresh_high] = jobs.enqueue_many(conn, [job("new-0", priority=0)], aging_seconds=aging)
    order = [jobs.claim(conn, "w", lease_seconds=60, use_slots=False).job_id for _ in range(3)]
    assert order == [old_low, fresh_high, old_lowest]


def test_dedupe_holds_under_concurrent_enqueue(db_url, conn):
    keys = [f"m{i}" for i in range(300)]
    start = threading.Barrier(8)

    def enqueue(seed: int) -> list[tuple[str, int]]:
        rnd = random.Random(seed)
        new: list[tuple[str, int]] = []
        with db.connect(db_url, autocommit=True) as c:
            start.wait()
            for _ in range(6):
                batch = rnd.sample(keys, 120)
                ids = jobs.enqueue_many(c, [job(k) for k in batch])
                new += [(k, jid) for k, jid in zip(batch, ids) if jid is not None]
        return new

    with ThreadPoolExecutor(8) as pool:
        answers = [pair for part in pool.map(enqueue, range(8)) for pair in part]
    rows = {(r["source_message_id"], r["id"]) for r in conn.execute("SELECT source_message_id, id FROM aibot.jobs")}
    per_key = Counter(k for k, _ in rows)
    assert all(n == 1 for n in per_key.values())
    assert len(answers) == len(rows), "each row was reported new exactly once"
    assert set(answers) == rows
