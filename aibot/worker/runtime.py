"""The claim actor's work: claim a job and a slot, generate, deliver, complete.

A reply is generated once. The generated reply (with its reply id and timestamp, so a re-send is
byte-identical) is written to the job row before it is posted (one small UPDATE, committed without
waiting for the WAL flush unless AIBOT_WORKER_SYNC_COMMIT=1); every later attempt -- a failed post, a
completion lost with its session, a worker killed after the post, a re-claim after the lease --
re-sends that stored reply and never generates again. The happy path is three short statements per
job: the claim, the store, and the completing UPDATE, each on an autocommit connection (its own
transaction, one round trip: no BEGIN or COMMIT of their own). With the Postgres sink in the worker's
own database it is two: the completing statement also inserts the `replies` row, so reply and
completion commit together and there is nothing to store first (no post leaves the database). A busy
claim loop also sends its next claim in the same pipeline as the completion (`jobs.
finish_delivered_and_claim`: one round trip, one transaction), so with that sink a job costs one
round trip and one transaction on the happy path, and its slot passes to the next job at once.

Connection loss is an expected event: the claim, the store, the completion and the heartbeat are
idempotent (fenced by the claim's token) and retried once on a fresh connection
(`Database.retrying`); a completion that failed after a successful post is retried at once, up to
`COMPLETE_ATTEMPTS`, and not left to the lease. An invocation never ends with an exception: it logs
and re-rings its doorbell, so no wake-up is dropped.

One `Runtime` per worker process holds what every invocation shares: the database pool, the hot-
reloaded entity config, HTTP clients per server, the sink, and the set of claims in flight (which a
heartbeat thread renews and a shutdown releases). The actor itself (aibot/actors/claim.py) is a thin
shell around `Runtime.run_invocation`.

Every state change goes through `aibot.queue.jobs` with the claim's fencing token, so a worker whose
lease was taken over can neither complete nor deliver: the sink's reply id is derived from the job,
which makes the rare double delivery (lease lost *during* the POST) a no-op at the chat server.

Owns no table and no SQL: it composes the queue (claims, rate limits, doorbells), the cluster
(server rows, health, demand loads), generation and delivery. It builds no broker, so tests and
benchmarks run it in-process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg

from aibot import db, log
from aibot.backends.base import Backend, BackendError, ContextOverflow, ModelNotLoaded, ServerFault
from aibot.backends.factory import backend_for_server, deployment_timeouts
from aibot.cluster import health, loader
from aibot.cluster import state as cluster_state
from aibot.config import ConfigStore
from aibot.delivery.sinks import PostgresSink, SinkError, make_sink, reply_id
from aibot.generation import postprocess, prompt
from aibot.generation.tokens import reply_tokens
from aibot.queue import doorbell, jobs, ratelimit
from aibot.settings import Settings, get_settings
from aibot.worker import registry

logger = logging.getLogger(__name__)


EMPTY_CLAIM_RETRIES = 2
#: Attempts of the completing UPDATE after a successful post (each on a fresh connection if the
#: session died); past them the stored reply waits for the lease and is re-sent, not regenerated.
COMPLETE_ATTEMPTS = 4


class GenerationAborted(Exception):
    """The job was handed back (shutdown) while its reply was still streaming in."""


@dataclass
class InFlight:
    job_id: int
    token: object
    released: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Invocation:
    """One claim loop's state, per thread: until `deadline` its completions also claim the next job
    (`jobs.finish_delivered_and_claim`), which they leave in `next_claim` for the loop."""

    deadline: float
    next_claim: jobs.Claim | None = None
    #: The last completion took a claim along and it came back empty.
    came_back_empty: bool = False


class InFlightRegistry:
    """Claims this process holds; the heartbeat renews them and shutdown releases them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, InFlight] = {}

    def add(self, job_id: int, token) -> InFlight:
        item = InFlight(job_id, token)
        with self._lock:
            self._items[job_id] = item
        return item

    def remove(self, job_id: int) -> None:
        with self._lock:
            self._items.pop(job_id, None)

    def snapshot(self) -> list[InFlight]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class BackendCache:
    """One HTTP client per server, rebuilt when the server's URL, kind or token variable changes."""

    def __init__(self, timeouts=None) -> None:
        self._lock = threading.Lock()
        self._clients: dict[int, tuple[tuple, Backend]] = {}
        self._timeouts = timeouts

    def get(self, server: dict) -> Backend:
        key = (server["kind"], server["url"], server.get("token_env"), server.get("default_parallel"))
        with self._lock:
            cached = self._clients.get(server["id"])
            if cached and cached[0] == key:
                return cached[1]
            if cached:
                cached[1].close()
            backend = backend_for_server(server, timeouts=self._timeouts)
            self._clients[server["id"]] = (key, backend)
            return backend

    def close_all(self) -> None:
        with self._lock:
            for _, backend in self._clients.values():
                try:
                    backend.close()
                except Exception:  # pragma: no cover - best effort at shutdown
                    pass
            self._clients.clear()


class DemandLoader:
    """Loads models that queued work needs and no usable server holds, off the actor threads.

    An idle claim kicks it; at most one pass runs per process at a time and passes are at least
    `min_interval` apart. The loader itself is single-flight cluster-wide (advisory lock per server and
    model), so many workers kicking at once still cause one load per model.
    """

    def __init__(self, runtime: "Runtime", min_interval: float = 1.0) -> None:
        self.runtime = runtime
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._running = False
        self._last = 0.0

    def kick(self) -> None:
        with self._lock:
            if self._running or time.monotonic() - self._last < self.min_interval:
                return
            self._running = True
            self._last = time.monotonic()
        threading.Thread(target=self._pass, name="aibot-demand-loader", daemon=True).start()

    def _pass(self) -> None:
        try:
            with log.context(worker=self.runtime.worker_id):
                loaded, failed = loader.load_for_demand(self.runtime.database, worker_id=self.runtime.worker_id)
                if loaded:
                    logger.info("loaded for queued work: %s", ", ".join(loaded))
                    with self.runtime.transaction() as conn:
                        doorbell.ring(conn)
        except db.CONNECTION_ERRORS as exc:   # expected: the next idle claim kicks another pass
            logger.warning("demand loading stopped: database session lost (%s: %s)", type(exc).__name__, exc)
        except Exception:
            logger.exception("demand loading failed")
        finally:
            with self._lock:
                self._running = False


class Runtime:
    def __init__(self, settings: Settings | None = None, *, role: str = "worker") -> None:
        self.settings = settings or get_settings()
        self.worker_id = self.settings.worker_id(role)
        self.async_commit = not self.settings.worker_sync_commit
        self.database = db.Database(self.settings.database_url, max_size=self.settings.worker_pool,
                                    async_commit=self.async_commit)
        self.config = ConfigStore(self.settings.config_path)
        self.sink = make_sink(self.settings)
        self.backends = BackendCache(deployment_timeouts(self.settings))
        self.inflight = InFlightRegistry()
        self.stopping = threading.Event()
        self.lease_seconds = float(self.settings.lease_seconds)
        self.budget_seconds = float(self.settings.invocation_budget_seconds)
        self._servers: dict[int, tuple[float, dict]] = {}
        self._servers_lock = threading.Lock()
        # server id, or (server id, model) -> monotonic time of our last fault there
        self._faulted: dict[int | tuple[int, str], float] = {}
        self._loader = DemandLoader(self)
        self.stream = self.settings.stream
        self._local = threading.local()   # .invocation: the _Invocation of this thread's claim loop

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A worker transaction. Unless `worker_sync_commit` (AIBOT_WORKER_SYNC_COMMIT=1) the sessions commit
        asynchronously (set once per connection): a crash of Postgres itself may then forget the last
        fraction of a second of claims and completions, which leases and the sink's job-derived reply
        ids absorb (the job runs again, its repeat post is a no-op), and in return no worker waits for a
        WAL flush per job.

        The block is one transaction, so several changes (a failure, its server fault, the cancelled
        rate reservation) commit together; the single-statement steps of the happy path (claim,
        store, completion) run on `database.autocommit()` connections instead (`Database.retrying(...,
        autocommit=True)`): one round trip each, no BEGIN/COMMIT.
        """
        with self.database.transaction() as conn, conn.transaction():
            yield conn

    # --- one actor invocation -------------------------------------------------------------------

    def run_invocation(self) -> int:
        """Claims and processes jobs until none is claimable or the time budget is spent.

        Going straight on to the next claim (taken by the last completion's own round trip while
        the budget lasts) keeps the per-job overhead to one or two short statements instead of a
        broker round trip per job; the budget keeps one invocation from hogging a thread
        forever, and the doorbell it rings on leaving hands the work to a fresh one.
        """
        with log.context(worker=self.worker_id):
            done = 0
            claim: jobs.Claim | None = None
            deadline = time.monotonic() + self.budget_seconds
            invocation = self._local.invocation = _Invocation(deadline)
            try:
                while not self.stopping.is_set():
                    if claim is None:
                        claim = self._claim(just_tried=invocation.came_back_empty)
                        if claim is None:
                            self._on_idle()
                            return done
                    current, claim = claim, None   # from here on `claim` is only a claim not yet processed
                    invocation.came_back_empty = False
                    self.process(current)
                    # The completion claimed the next job in its own round trip (before the deadline only).
                    claim, invocation.next_claim = invocation.next_claim, None
                    done += 1
                    if claim is None and time.monotonic() >= deadline:
                        self._ring("time budget spent")
                        return done
                return done
            except Exception as exc:
                # Never raise into Dramatiq: the actor has no retries, so a raise would drop this
                # wake-up and leave claimable work to the scheduler's doorbell tick.
                logger.error("claim loop stopped (%s: %s); ringing the doorbell again so the work is picked up",
                             type(exc).__name__, exc, exc_info=not isinstance(exc, db.CONNECTION_ERRORS))
                self._ring("after an error")
                return done
            finally:
                self._local.invocation = None
                if claim is not None:   # claimed by the last completion, then the worker began stopping
                    self._hand_back(claim)

    def _hand_back(self, claim: jobs.Claim) -> None:
        """A claim this loop will not process goes back to the queue, its attempt refunded."""
        try:
            self.database.retrying("hand back the next claim", lambda conn: jobs.release(
                conn, claim.job_id, claim.token), autocommit=True)
        except db.CONNECTION_ERRORS as exc:
            logger.warning("could not hand back job %s (%s); it returns after its lease", claim.job_id, exc)
            return
        self._ring("after handing a claim back")

    def _next_claim_wanted(self) -> jobs.NextClaim | None:
        """The next claim a completion should take along: only inside a claim loop, before its
        deadline, while the worker is not stopping."""
        invocation = getattr(self._local, "invocation", None)
        if invocation is None or self.stopping.is_set() or time.monotonic() >= invocation.deadline:
            return None
        return jobs.NextClaim(self.worker_id, self.lease_seconds)

    def _completion_step(self, claim: jobs.Claim, reply: dict | None, *, started_at: datetime | None,
                         generated_at: datetime | None, row: dict | None):
        """The `Database.retrying` step that completes a delivered job (with `row`: inserting the
        Postgres sink's row too). Its first attempt also claims the invocation's next job in the same
        round trip and transaction; a retry does not, since the first attempt's claim may have
        committed with its lost session (that job then waits for its lease; it never runs twice)."""
        first = [True]

        def plain(conn) -> bool:
            if row is None:
                return jobs.finish_delivered(conn, claim.job_id, claim.token, reply, started_at=started_at,
                                             generated_at=generated_at)
            return jobs.finish_delivered_into_replies(conn, claim.job_id, claim.token, reply, started_at=started_at,
                                                      generated_at=generated_at, row=row)

        def step(conn) -> bool:
            wanted = self._next_claim_wanted() if first[0] else None
            first[0] = False
            if wanted is None:
                ok = plain(conn)
            else:
                try:
                    ok, nxt = jobs.finish_delivered_and_claim(conn, claim.job_id, claim.token, reply,
                                                              started_at=started_at, generated_at=generated_at,
                                                              row=row, next_claim=wanted)
                except db.CONNECTION_ERRORS:
                    raise
                except psycopg.Error as exc:   # both were rolled back: complete alone, claim in the loop
                    logger.warning("completing with the next claim failed (%s: %s); completing alone",
                                   type(exc).__name__, exc)
                    ok = plain(conn)
                else:
                    self._local.invocation.next_claim = nxt
                    self._local.invocation.came_back_empty = nxt is None
            # A retry after a commit whose acknowledgement was lost finds the job already done by us.
            return ok or jobs.finished_by(conn, claim.job_id, claim.token) == "done"

        return step

    def _ring(self, why: str) -> None:
        try:
            self.database.retrying("ring the doorbell", doorbell.ring)
        except Exception as exc:
            logger.warning("could not ring the doorbell %s (%s); the scheduler's doorbell tick will", why, exc)

    def _claim(self, *, just_tried: bool = False) -> jobs.Claim | None:
        """A claim, retried briefly when it came back empty although claimable work exists: rows
        locked by other claimers or by a rebalance are skipped (SKIP LOCKED), and giving up then would
        leave a free slot idle until the next doorbell.

        `just_tried`: the completion before took a claim along and it came back empty, so the same
        statement again would almost always be empty too (three claims per job on a quiet queue, each
        the most expensive statement of the path): only the doorbell's cheaper count decides whether
        to try again."""
        if just_tried and self.database.retrying("probe for claimable work", doorbell.matchable,
                                                 autocommit=True) == 0:
            return None

        def step(conn):
            claim = jobs.claim(conn, self.worker_id, lease_seconds=self.lease_seconds, use_slots=True)
            return claim, claim is None and doorbell.matchable(conn) > 0

        for attempt in range(EMPTY_CLAIM_RETRIES + 1):
            # Retrying a claim whose commit was lost with its session at worst strands that one job
            # until its lease ends (we never learnt its token); it never runs twice at once.
            claim, more = self.database.retrying("claim", step, autocommit=True)
            if claim is not None or attempt == EMPTY_CLAIM_RETRIES or not more:
                return claim
            time.sleep(0.005 * (attempt + 1))
        return None

    def process(self, claim: jobs.Claim) -> None:
        item = self.inflight.add(claim.job_id, claim.token)
        try:
            with log.context(worker=self.worker_id, job=claim.job_id, entity=claim.entity_id, model=claim.model,
                             server=claim.server_id):
                try:
                    server = self._server(claim.server_id) if claim.server_id is not None else None
                    with log.context(server=server["name"] if server else None):
                        self._process(claim, server, item)
                except db.CONNECTION_ERRORS as exc:
                    logger.error("database session lost mid-job (%s: %s); the job returns after its lease "
                                 "(a stored reply is re-sent, not regenerated)", type(exc).__name__, exc)
                except Exception:
                    logger.exception("unexpected error; the job's lease will expire and it will be retried")
        finally:
            self.inflight.remove(claim.job_id)

    def _process(self, claim: jobs.Claim, server: dict | None, item: InFlight) -> None:
        if claim.reply is not None:
            logger.info("re-sending the stored reply %s (an earlier attempt generated it)",
                        claim.reply.get("id") or reply_id(claim.job_id))
            self._deliver(claim, claim.reply, stored=True, note="re-sent")
            return
        cfg = self.config.get()
        entity = cfg.entity(claim.entity_id)
        if entity is None or not entity.enabled:
            why = "unknown entity" if entity is None else "entity disabled"
            with self.transaction() as conn:
                jobs.reject(conn, claim.job_id, claim.token, f"{why}: {claim.entity_id!r}")
            logger.warning("rejected: %s", why)
            return
        if server is None:  # a slot-less claim without a stored reply cannot generate
            with self.transaction() as conn:
                jobs.release(conn, claim.job_id, claim.token)
            return
        if entity.rate_limits is not None:
            with self.transaction() as conn:
                retry_at = ratelimit.reserve(conn, entity, claim.job_id)
                if retry_at is not None:
                    jobs.release(conn, claim.job_id, claim.token, available_at=retry_at)
            if retry_at is not None:
                logger.info("rate limited; deferred until %s", retry_at.isoformat())
                return

        payload = claim.payload
        ais = payload.get("ais") or {}
        try:
            backend = self._backend(server)
        except BackendError as exc:
            self._generation_failed(claim, server, exc, item)
            return
        try:
            request = self._fit(backend, claim, entity, cfg, payload, ais)
        except ValueError as exc:  # no prompt can be built, or none fits the instance: for good
            why = f"cannot build the request: {exc}"
            with self.transaction() as conn:
                jobs.reject(conn, claim.job_id, claim.token, why)
                ratelimit.cancel(conn, claim.job_id)
            logger.warning("rejected: %s", why)
            return
        started = time.monotonic()
        started_at = _now()
        try:
            raw, tokens = self._generate(backend, request, item)
        except ContextOverflow as exc:
            # Our count was off (no server tokenizer): deterministic, so the job is rejected now
            # rather than retried into the same wall (it does not burn attempts on other servers).
            why = f"the prompt does not fit the context of {claim.instance or claim.model} on {server['name']}: {exc}"
            with self.transaction() as conn:
                jobs.reject(conn, claim.job_id, claim.token, why)
                ratelimit.cancel(conn, claim.job_id)
            logger.warning("rejected: %s", why)
            return
        except BackendError as exc:
            self._generation_failed(claim, server, exc, item)
            return
        except GenerationAborted:
            logger.info("generation stopped at shutdown; the job is back in the queue")
            return
        self._server_ok(server, claim.model)
        text = postprocess.clean_reply(raw, entity, cfg.global_settings)
        if text is None:
            with self.transaction() as conn:
                jobs.complete(conn, claim.job_id, claim.token, state="skipped",
                              reason="model answered [SKIP]" if "[SKIP]" in raw else "empty reply after post-processing")
                ratelimit.cancel(conn, claim.job_id)
            logger.info("no reply to post (%.2fs)", time.monotonic() - started)
            return
        generated_at = _now()
        reply = {
            "id": reply_id(claim.job_id),
            "text": text,
            "username": ais.get("name") or entity.username,
            "color": ais.get("color") or entity.color,
            "timestamp": int(generated_at.timestamp() * 1000),
            "entity": entity.id,
            "model": claim.model,
            "server": server["name"],
            "generated_at": generated_at.isoformat(),
            "tokens": reply_tokens(raw, tokens),    # adaptive concurrency's samples (never sent to the chat)
        }
        note = f"{len(text)} chars generated in {time.monotonic() - started:.2f}s"
        if item.released.is_set():
            logger.warning("not delivering: the job was handed back at shutdown and will run again (%s)", note)
            return
        if self._completes_into_replies():
            # The reply and the completion commit in one statement: nothing outside the database
            # sees the reply before it is durable, so there is nothing to store first.
            self._deliver(claim, reply, stored=False, note=note, started_at=started_at, generated_at=generated_at)
            return
        if not self._store(claim, reply, started_at, generated_at):
            return
        self._deliver(claim, reply, stored=True, note=note)

    def _store(self, claim: jobs.Claim, reply: dict, started_at: datetime, generated_at: datetime) -> bool:
        """The reply made durable on the job before it leaves; False means do not post it."""
        try:
            ok = self.database.retrying("store the reply", lambda conn: jobs.store_reply(
                conn, claim.job_id, claim.token, reply, started_at=started_at, generated_at=generated_at),
                autocommit=True)
        except db.CONNECTION_ERRORS as exc:
            # Posting a reply that is not durable could post a second, different one after the
            # lease: better a regeneration nobody sees than two answers.
            logger.error("could not store the reply (%s); not posting it, the job runs again after its lease", exc)
            return False
        if not ok:
            logger.warning("not delivering: the claim was lost (lease expired or job cancelled)")
        return ok

    def _fit(self, backend: Backend, claim: jobs.Claim, entity, cfg, payload: dict, ais: dict):
        """The request, with its history trimmed to the serving instance's context (per request: per
        slot on llama.cpp) minus the reply's max_tokens (`prompt.fit`: the estimate, or near the budget
        the server's own tokenizer). Raises ValueError (PromptTooLong) when even the prompt and the
        message alone cannot fit."""
        budget = prompt.context_budget(claim.context_length, entity.max_tokens, entity.context_token_budget)
        model = claim.instance or claim.model

        def build(count_tokens=None):
            return prompt.build_request(
                entity, text=payload.get("text", ""), sender=payload.get("username", ""),
                context_lines=payload.get("context", []), model=model, global_settings=cfg.global_settings,
                token_budget=budget, count_tokens=count_tokens, ai_name=ais.get("name"))

        if budget is None:
            return build()
        request, need = prompt.fit(build, budget, lambda text: backend.tokenize(model, text))
        if need > budget:
            raise prompt.PromptTooLong(
                f"the prompt and the message alone need {need} tokens, but {model} on its server allows "
                f"{budget} (context {claim.context_length} per request − max_tokens − template margin)")
        return request

    def _completes_into_replies(self) -> bool:
        """The sink is the `replies` table of the worker's own database: the completion writes it."""
        return isinstance(self.sink, PostgresSink) and self.sink.shares(self.database)

    def _deliver(self, claim: jobs.Claim, reply: dict, *, stored: bool, note: str,
                 started_at: datetime | None = None, generated_at: datetime | None = None) -> None:
        """Posts the reply and completes the job. A stored reply is already on the job row, so
        neither step needs to carry it again; an unstored one goes only into the statement that
        writes it to the Postgres sink and completes the job together."""
        if self._completes_into_replies():
            self._complete_into_replies(claim, reply, stored=stored, note=note, started_at=started_at,
                                        generated_at=generated_at)
            return
        try:
            sent_id = self.sink.deliver(claim.job_id, claim.payload, reply)
        except SinkError as exc:
            # The stored reply stays, so the retry only re-sends it. An outage of the sink is not the
            # job's fault (no attempt burnt); a sink that rejects the reply outright (4xx) is.
            error = f"delivery failed: {exc}"
            retryable = getattr(exc, "retryable", True)
            try:
                state = self.database.retrying("record the failed delivery", lambda conn: jobs.fail(
                    conn, claim.job_id, claim.token, error, server_fault=retryable))
            except db.CONNECTION_ERRORS as db_exc:
                logger.error("delivery failed (%s) and could not be recorded (%s); the stored reply is re-sent "
                             "after the lease", exc, db_exc)
                return
            logger.warning("delivery failed (%s); job is %s, the stored reply will be re-sent", exc, state)
            return
        self._complete_delivered(claim, sent_id, note)

    def _complete_into_replies(self, claim: jobs.Claim, reply: dict, *, stored: bool, note: str,
                               started_at: datetime | None, generated_at: datetime | None) -> None:
        """The Postgres sink's row inserted by the fenced completing statement, retried at once on a
        fresh connection like any completion. A lost claim writes nothing; so does a session lost
        before the commit, and then an unstored reply is generated again after the lease -- which
        nobody can tell, since nothing of it was ever delivered."""
        row = self.sink.row(claim.job_id, claim.payload, reply)
        step = self._completion_step(claim, None if stored else reply, started_at=started_at,
                                     generated_at=generated_at, row=row)
        try:
            ok = self.database.retrying("complete the job with its reply", step, attempts=COMPLETE_ATTEMPTS,
                                        pause=0.2, autocommit=True)
        except db.CONNECTION_ERRORS as exc:
            logger.error("could not complete the job with its reply (%s); nothing was delivered (reply and completion "
                         "commit together), the job runs again after its lease (%s)", exc, note)
            return
        except psycopg.Error as exc:
            # The replies row was refused (a constraint): a failed delivery, recorded as the sink's
            # own failure would be, with the reply kept so the retry re-sends rather than regenerates.
            error = f"delivery failed: replies insert: {type(exc).__name__}: {exc}"

            def record(conn):
                with conn.transaction():
                    if not stored:
                        jobs.store_reply(conn, claim.job_id, claim.token, reply, started_at=started_at,
                                         generated_at=generated_at)
                    return jobs.fail(conn, claim.job_id, claim.token, error, server_fault=True)

            try:
                state = self.database.retrying("record the failed delivery", record)
            except db.CONNECTION_ERRORS as db_exc:
                logger.error("%s, and could not be recorded (%s); the job runs again after its lease", error, db_exc)
                return
            logger.warning("%s; job is %s", error, state)
            return
        if ok:
            logger.info("delivered as %s (%s)", row["reply_id"], note)
        else:
            logger.warning("not delivered: the claim was lost (lease expired or job cancelled); whoever holds the job "
                           "delivers it (%s)", note)

    def _complete_delivered(self, claim: jobs.Claim, sent_id: str, note: str) -> None:
        """The completing UPDATE after a successful post, retried at once on a fresh connection: left
        to the lease, a lost completion would cost a lease of latency and a repeat post."""
        step = self._completion_step(claim, None, started_at=None, generated_at=None, row=None)
        try:
            ok = self.database.retrying("complete the delivered job", step, attempts=COMPLETE_ATTEMPTS, pause=0.2,
                                        autocommit=True)
        except db.CONNECTION_ERRORS as exc:
            logger.error("delivered as %s but could not complete the job (%s); after its lease the stored reply "
                         "is re-sent with the same id, not regenerated", sent_id, exc)
            return
        if ok:
            logger.info("delivered as %s (%s)", sent_id, note)
        else:
            logger.warning("delivered as %s but the lease was lost; the same stored reply and id are re-sent by "
                           "whoever holds the job", sent_id)

    def _generate(self, backend: Backend, request, item: InFlight) -> tuple[str, int | None]:
        """The reply text and its token count as the server reported it (or None). Streamed (unless
        `stream` is off, AIBOT_STREAM=0) so that a shutdown past its timeout stops the generation
        between tokens; closing the stream tells the server the client is gone (LM Studio then stops
        generating) and frees its slot at once."""
        if not self.stream:
            result = backend.chat(request)
            return result.text, result.completion_tokens
        parts: list[str] = []
        deltas = backend.chat_stream(request)
        try:
            while True:
                try:
                    delta = next(deltas)
                except StopIteration as end:   # the stream's return value: the server's count
                    return "".join(parts), end.value
                if item.released.is_set():
                    raise GenerationAborted()
                parts.append(delta)
        finally:
            deltas.close()

    def _backend(self, server: dict) -> Backend:
        try:
            return self.backends.get(server)
        except ValueError as exc:  # e.g. its token variable is unset: the server is unusable, not the job
            raise ServerFault(str(exc)) from None

    def _generation_failed(self, claim: jobs.Claim, server: dict, exc: BackendError, item: InFlight) -> None:
        """Blames the scope the fault belongs to: a connection-level fault backs the server off for
        everyone; a fault of this model there (a cut stream, a 5xx from its instance) backs off only
        the (server, model) pair; a request fault is the job's. Neither server nor model faults burn
        the job's attempts."""
        if item.released.is_set():
            # Shutdown handed the job back and closed our HTTP clients: not the server's fault.
            logger.info("generation aborted at shutdown; the job is back in the queue")
            return
        # A model the server does not hold is our stale view of the cluster, not the job's fault.
        server_fault = exc.server_fault or isinstance(exc, ModelNotLoaded)
        scope = "model" if isinstance(exc, ModelNotLoaded) else exc.scope
        error = f"{type(exc).__name__}: {exc}"
        if scope == "server":
            self._faulted[server["id"]] = time.monotonic()
        elif scope == "model":
            self._faulted[(server["id"], claim.model)] = time.monotonic()

        def record(conn):
            # Retried on a fresh connection when the session died or the transaction was a deadlock's
            # victim (both OperationalErrors): the failure is fenced by the token, so a repeat after a
            # commit whose acknowledgement was lost changes nothing; left unrecorded, the job would
            # wait out its lease.
            with conn.transaction():
                if scope == "server":
                    health.record_fault(conn, server["id"], error)
                elif scope == "model":
                    health.record_model_fault(conn, server["id"], claim.model, error)
                state = jobs.fail(conn, claim.job_id, claim.token, error, server_fault=server_fault)
                ratelimit.cancel(conn, claim.job_id)
            return state

        state = self.database.retrying("record the failed generation", record)
        logger.warning("generation failed (%s, %s scope); job is now %s", error, scope, state)

    def _server_ok(self, server: dict, model: str) -> None:
        """Resets the shared failure counts of the server and of (server, model), but only if this
        process saw them fail recently: an UPDATE per reply on a shared row would be a hot spot."""
        if server["id"] in self._faulted or (server["id"], model) in self._faulted:
            with self.transaction() as conn:
                if self._faulted.pop(server["id"], None) is not None:
                    health.record_ok(conn, server["id"])
                if self._faulted.pop((server["id"], model), None) is not None:
                    health.record_model_ok(conn, server["id"], model)

    def _server(self, server_id: int) -> dict:
        now = time.monotonic()
        with self._servers_lock:
            cached = self._servers.get(server_id)
            if cached and now - cached[0] < 10.0:
                return cached[1]
        with self.database.transaction() as conn:
            row = cluster_state.server_by_id(conn, server_id)
        if row is None:
            raise LookupError(f"server id {server_id} is not in aibot.servers")
        with self._servers_lock:
            self._servers[server_id] = (now, row)
        return row

    def _on_idle(self) -> None:
        """Nothing claimable: if queued work waits for a model no server holds, start a load."""
        self._loader.kick()

    # --- process lifecycle ----------------------------------------------------------------------

    def renew_leases(self) -> None:
        """Renews every claim in flight and the process's heartbeat (renewal cadence:
        `Settings.renewal_seconds`) on one autocommit connection, retried once on a fresh one.

        Each renewal is its own statement and transaction: one transaction renewing them all held
        the row locks of the jobs already renewed while it waited for the next one (locked by a
        thread failing or completing it), which closed deadlock cycles with the slot-freeing
        trigger of that thread and any transaction holding slots (seen in the chaos run). A renewal
        needs no other for company."""
        items = [i for i in self.inflight.snapshot() if not i.released.is_set()]

        def step(conn):
            for item in items:
                jobs.renew(conn, item.job_id, item.token, self.lease_seconds)
            registry.heartbeat(conn, self.worker_id)

        self.database.retrying("renew leases and heartbeat", step, autocommit=True)

    def release_all(self, reason: str) -> int:
        """Hands every in-flight job back to the queue with its attempt refunded (shutdown deadline)."""
        released = 0
        items = self.inflight.snapshot()
        if not items:
            return 0
        with self.database.transaction() as conn:
            for item in items:
                item.released.set()
                if jobs.release(conn, item.job_id, item.token):
                    released += 1
        logger.warning("released %d in-flight job(s): %s", released, reason)
        return released

    def close(self) -> None:
        self.backends.close_all()
        self.database.close()


def _now() -> datetime:
    return datetime.now(timezone.utc)
