-- Named queries of the job queue (aibot.jobs). Functions and triggers they rely on are in
-- sql/migrations/0002_queue.sql. Every token-taking query matches `claim_token` AND `state = 'running'`,
-- so a worker whose lease was reclaimed (and maybe re-claimed by another) changes nothing. The slot of a
-- job leaving `running` is freed by the jobs_free_slot triggers, not here.

-- jobs_enqueue --
-- Inserts a batch in one round trip; returns (ord, id) in input order, id NULL for duplicates (also within the batch)
-- Ids are drawn in input order (FIFO within a batch), rows are inserted in key order so two overlapping
-- batches wait for each other instead of deadlocking.
WITH input AS (
    SELECT r.*, nextval(pg_get_serial_sequence('aibot.jobs', 'id')) AS new_id
    FROM ROWS FROM (
        jsonb_to_recordset(%(jobs)s::jsonb) AS (
            source text, source_message_id text, entity_id text, model text, priority smallint,
            payload jsonb, message_at timestamptz, max_attempts integer, state aibot.job_state,
            reason text, available_at timestamptz)
    ) WITH ORDINALITY AS r (source, source_message_id, entity_id, model, priority, payload, message_at,
                             max_attempts, state, reason, available_at, ord)
), firsts AS (
    SELECT DISTINCT ON (source, source_message_id, entity_id) *
    FROM input
    ORDER BY source, source_message_id, entity_id, ord
), ins AS (
    INSERT INTO jobs (id, source, source_message_id, entity_id, model, priority, rank, state, payload,
                      max_attempts, available_at, message_at, reason, finished_at)
    OVERRIDING SYSTEM VALUE
    SELECT new_id, source, source_message_id, entity_id, model, priority,
           extract(epoch FROM now())::double precision + priority * %(aging_seconds)s::double precision,
           state, coalesce(payload, '{}'::jsonb), max_attempts, coalesce(available_at, now()), message_at,
           reason, CASE WHEN state = 'queued' THEN NULL ELSE now() END
    FROM firsts
    ORDER BY source, source_message_id, entity_id
    ON CONFLICT (source, source_message_id, entity_id) DO NOTHING
    RETURNING id
)
SELECT i.ord, ins.id
FROM input i
LEFT JOIN ins ON ins.id = i.new_id
ORDER BY i.ord;

-- jobs_claim --
-- Claims up to %(limit)s jobs in priority order (slot-aware when use_slots); see aibot.claim_jobs in
-- 0002_queue.sql. The serving instance's own name and per-request context come along (one statement),
-- looked up by primary key per claimed row: as a plain join (or a LATERAL the planner flattens into one)
-- the planner takes the function for 1,000 rows and hashes all of model_instances, a Seq Scan that grows
-- with the cluster; the LIMIT keeps the subquery from being flattened.
SELECT c.*, mi.instance_id, mi.context_length
FROM claim_jobs(%(worker_id)s, %(lease_seconds)s::double precision, %(use_slots)s,
                %(limit)s::integer, %(max_scan)s::integer) c
LEFT JOIN LATERAL (SELECT m.instance_id, m.context_length FROM model_instances m
                   WHERE m.server_id = c.server_id AND m.model = c.model LIMIT 1) mi ON true;

-- jobs_renew --
-- Extends the lease of a running job (heartbeat); nothing happens unless the token still holds it
UPDATE jobs
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::double precision)
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING lease_expires_at;

-- jobs_store_reply --
-- Makes a generated reply durable on the job before it is posted, so every retry re-sends it instead of generating
UPDATE jobs
SET reply = %(reply)s::jsonb,
    started_at = coalesce(%(started_at)s::timestamptz, started_at),
    generated_at = coalesce(%(generated_at)s::timestamptz, now())
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING id;

-- jobs_complete --
-- Finishes a running job as done (sink accepted the reply) or skipped (nothing to post)
UPDATE jobs
SET state = %(state)s::job_state,
    reason = %(reason)s,
    finished_at = now(),
    delivered_at = CASE WHEN %(state)s::job_state = 'done' THEN now() ELSE delivered_at END,
    lease_expires_at = NULL
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING id;

-- jobs_finish_delivered --
-- Finishes a job the sink accepted; a reply or timing left NULL keeps what jobs_store_reply stored
UPDATE jobs
SET state = 'done',
    reply = coalesce(%(reply)s::jsonb, reply),
    started_at = coalesce(%(started_at)s::timestamptz, started_at),
    generated_at = coalesce(%(generated_at)s::timestamptz, generated_at),
    finished_at = now(),
    delivered_at = now(),
    lease_expires_at = NULL
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING id;

-- jobs_finish_delivered_into_replies --
-- Finishes a job and inserts its reply for the Postgres sink in one fenced statement: both commit or neither
WITH done AS (
    UPDATE jobs
    SET state = 'done',
        reply = coalesce(%(reply)s::jsonb, reply),
        started_at = coalesce(%(started_at)s::timestamptz, started_at),
        generated_at = coalesce(%(generated_at)s::timestamptz, generated_at, now()),
        finished_at = now(),
        delivered_at = now(),
        lease_expires_at = NULL
    WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
    RETURNING id
), delivered AS (
    INSERT INTO replies (reply_id, job_id, reply_to, entity_id, message)
    SELECT %(reply_id)s, done.id, %(reply_to)s, %(entity_id)s, %(message)s::jsonb FROM done
    ON CONFLICT (reply_id) DO NOTHING
)
SELECT id FROM done;

-- jobs_finished_by --
-- Whether a claim's completion already committed (its acknowledgement was lost with the session)
SELECT state::text AS state FROM jobs
WHERE id = %(job_id)s AND claim_token = %(token)s AND state IN ('done', 'skipped', 'rejected');

-- jobs_complete_many --
-- Batched completion for batched claims: finishes each (id, token) pair that still holds its job
UPDATE jobs j
SET state = %(state)s::job_state,
    reason = %(reason)s,
    finished_at = now(),
    delivered_at = CASE WHEN %(state)s::job_state = 'done' THEN now() ELSE j.delivered_at END,
    lease_expires_at = NULL
FROM unnest(%(job_ids)s::bigint[], %(tokens)s::uuid[]) AS c (id, token)
WHERE j.id = c.id AND j.claim_token = c.token AND j.state = 'running'
RETURNING j.id;

-- jobs_lock_running --
-- Reads the retry budget of a running job under lock, so the failure outcome is decided on current counts
SELECT attempts, max_attempts, server_faults, max_server_faults
FROM jobs
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
FOR UPDATE;

-- jobs_fail --
-- Applies a failure outcome decided by aibot.retry: back to queued after a delay, or dead
UPDATE jobs
SET state = %(state)s::job_state,
    attempts = %(attempts)s,
    server_faults = %(server_faults)s,
    available_at = now() + make_interval(secs => %(delay_seconds)s::double precision),
    last_error = %(error)s,
    reason = CASE WHEN %(state)s::job_state = 'dead' THEN %(reason)s ELSE reason END,
    finished_at = CASE WHEN %(state)s::job_state = 'dead' THEN now() ELSE NULL END,
    lease_expires_at = NULL
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING state::text AS state;

-- jobs_release --
-- Hands a running job back without counting the attempt (shutdown, rate-limit deferral)
UPDATE jobs
SET state = 'queued',
    attempts = greatest(attempts - 1, 0),
    available_at = coalesce(%(available_at)s::timestamptz, now()),
    lease_expires_at = NULL
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING id;

-- jobs_reject --
-- A worker found the job can never run (e.g. entity gone from the config): recorded with a reason, not dropped
UPDATE jobs
SET state = 'rejected', reason = %(reason)s, finished_at = now(), lease_expires_at = NULL
WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
RETURNING id;

-- jobs_cancel --
-- Operator cancel: a queued job, or a running one only with force (its worker's later calls are then refused)
UPDATE jobs
SET state = 'cancelled', reason = %(reason)s, finished_at = now(), lease_expires_at = NULL
WHERE id = %(job_id)s AND (state = 'queued' OR (%(force)s AND state = 'running'))
RETURNING id;

-- jobs_reclaim_expired --
-- Running jobs whose lease ran out go back to queued, or dead once their attempts are used up
UPDATE jobs j
SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead'::job_state ELSE 'queued'::job_state END,
    last_error = 'lease expired',
    reason = CASE WHEN j.attempts >= j.max_attempts THEN 'lease expired' ELSE j.reason END,
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() ELSE NULL END,
    available_at = now(),
    lease_expires_at = NULL
FROM (
    SELECT id FROM jobs
    WHERE state = 'running' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
) expired
WHERE j.id = expired.id
RETURNING j.id, j.state::text AS state;

-- jobs_prune --
-- Deletes up to %(batch)s finished rows older than the retention (called in a loop: short transactions)
DELETE FROM jobs j
USING (
    SELECT id FROM jobs
    WHERE finished_at < now() - make_interval(secs => %(older_than_seconds)s::double precision)
      AND state IN ('done', 'skipped', 'dead', 'rejected', 'cancelled')
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
) old
WHERE j.id = old.id;

-- jobs_get --
-- One job row, for operators and tests
SELECT * FROM jobs WHERE id = %(job_id)s;

-- jobs_next_available --
-- When the earliest queued job becomes runnable (NULL: nothing queued); lets a scheduler sleep until then
SELECT min(available_at) AS available_at FROM jobs WHERE state = 'queued';

-- jobs_counts --
-- Jobs per state, for status output and metrics
SELECT state::text AS state, count(*) AS n FROM jobs GROUP BY state ORDER BY state;

-- jobs_note_waiting --
-- Tells the queued jobs of a model why they still wait (no server can load it, and why), once per change
UPDATE jobs SET waiting_reason = %(reason)s
WHERE state = 'queued' AND model = %(model)s AND waiting_reason IS DISTINCT FROM %(reason)s;

-- jobs_clear_waiting --
-- The model can be served now: the waiting notes of its queued jobs no longer hold
UPDATE jobs SET waiting_reason = NULL
WHERE state = 'queued' AND model = %(model)s AND waiting_reason IS NOT NULL;

-- jobs_expire_leases_of --
-- A supervisor saw these worker processes die: their leases end now, so the next reclaim tick re-queues the jobs
UPDATE jobs SET lease_expires_at = now()
WHERE state = 'running' AND worker_id = ANY(%(worker_ids)s::text[]) AND lease_expires_at > now()
RETURNING id;
