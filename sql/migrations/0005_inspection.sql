-- Operator views, requeue/discard functions and the LISTEN/NOTIFY event feed.
--
-- Everything an operator reads (`aibot status`, `aibot serve`, psql) goes through these views, so the
-- CLI, the dashboard, /metrics and a human at a psql prompt see the same numbers. They depend only on
-- the base tables of 0001_core.sql.
--
--   aibot.priority_band(p)    'critical' ≤10, 'high' 11–30, 'medium' 31–60, 'low' 61–90, 'background' >90
--   aibot.queue_depth         jobs per (state, priority band)
--   aibot.queue_oldest        how long the oldest queued job has waited (one row)
--   aibot.in_flight           running jobs with worker, server, model and lease time left
--   aibot.failed_jobs         dead and rejected jobs with their reasons
--   aibot.server_health       health, backoff, draining, memory budget vs accounted memory
--   aibot.slot_usage          slots used/total per (server, model)
--   aibot.throughput          replies/min and p50/p95 wait and end-to-end latency, last 5 and 60 minutes
--   aibot.entity_counts       jobs per entity and state
--   aibot.worker_status       registered processes and their heartbeat age
--   aibot.requeue_job(id), aibot.discard_job(id, reason)

-- Bands of the original monitor (original-bot.md §3.3), used by views, /metrics and the dashboard.
CREATE FUNCTION aibot.priority_band(p integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p <= 10 THEN 'critical'
                WHEN p <= 30 THEN 'high'
                WHEN p <= 60 THEN 'medium'
                WHEN p <= 90 THEN 'low'
                ELSE 'background' END
$$;

-- Sort key for bands, so tables list critical first.
CREATE FUNCTION aibot.priority_band_order(band text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_position(ARRAY['critical', 'high', 'medium', 'low', 'background'], band)
$$;

CREATE VIEW aibot.queue_depth AS
SELECT state,
       aibot.priority_band(priority) AS band,
       count(*)::bigint               AS jobs,
       count(*) FILTER (WHERE state = 'queued' AND available_at <= now())::bigint AS runnable
FROM aibot.jobs
GROUP BY state, aibot.priority_band(priority)
ORDER BY state, aibot.priority_band_order(aibot.priority_band(priority));

CREATE VIEW aibot.queue_oldest AS
SELECT count(*)::bigint                                            AS queued,
       count(*) FILTER (WHERE available_at <= now())::bigint       AS runnable,
       min(created_at)                                             AS oldest_created_at,
       extract(epoch FROM now() - min(created_at))::double precision AS oldest_wait_seconds,
       extract(epoch FROM now() - min(created_at) FILTER (WHERE available_at <= now()))::double precision
                                                                   AS oldest_runnable_wait_seconds
FROM aibot.jobs
WHERE state = 'queued';

CREATE VIEW aibot.in_flight AS
SELECT j.id, j.entity_id, j.model, j.priority, j.attempts, j.max_attempts,
       j.worker_id, j.server_id, s.name AS server,
       j.claimed_at, j.started_at, j.lease_expires_at,
       extract(epoch FROM now() - j.claimed_at)::double precision        AS running_seconds,
       extract(epoch FROM j.lease_expires_at - now())::double precision  AS lease_left_seconds,
       (j.reply IS NOT NULL)                                             AS has_reply
FROM aibot.jobs j
LEFT JOIN aibot.servers s ON s.id = j.server_id
WHERE j.state = 'running'
ORDER BY j.claimed_at;

CREATE VIEW aibot.failed_jobs AS
SELECT j.id, j.state, j.entity_id, j.model, j.priority, j.attempts, j.max_attempts,
       j.server_faults, j.reason, j.last_error, j.source, j.source_message_id,
       j.created_at, j.finished_at, s.name AS server
FROM aibot.jobs j
LEFT JOIN aibot.servers s ON s.id = j.server_id
WHERE j.state IN ('dead', 'rejected')
ORDER BY coalesce(j.finished_at, j.created_at) DESC, j.id DESC;

-- Accounted memory follows the sizing formula of DESIGN.md: loaded models + one buffer per in-flight
-- request + system reserve + safety margin; budget_left_bytes < 0 means the invariant is broken.
CREATE VIEW aibot.server_health AS
WITH inst AS (
    SELECT server_id, count(*)::bigint AS models_loaded, coalesce(sum(size_bytes), 0)::bigint AS models_bytes
    FROM aibot.model_instances GROUP BY server_id
), sl AS (
    SELECT server_id,
           count(*) FILTER (WHERE NOT retired)::bigint        AS slots_total,
           count(*) FILTER (WHERE job_id IS NOT NULL)::bigint AS slots_used
    FROM aibot.slots GROUP BY server_id
), acc AS (
    SELECT s.*,
           coalesce(inst.models_loaded, 0) AS models_loaded,
           coalesce(inst.models_bytes, 0)  AS models_bytes,
           coalesce(sl.slots_total, 0)     AS slots_total,
           coalesce(sl.slots_used, 0)      AS slots_used
    FROM aibot.servers s
    LEFT JOIN inst ON inst.server_id = s.id
    LEFT JOIN sl ON sl.server_id = s.id
)
SELECT id, name, url, kind, enabled, draining, health, failure_count, backoff_level, backoff_until,
       greatest(extract(epoch FROM backoff_until - now()), 0)::double precision AS backoff_left_seconds,
       last_ok_at, last_error, refreshed_at,
       memory_bytes, models_loaded, models_bytes, slots_total, slots_used,
       (slots_used * per_request_bytes)::bigint AS inflight_bytes,
       (models_bytes + slots_used * per_request_bytes + system_reserve_bytes
           + (safety_fraction * coalesce(memory_bytes, 0))::bigint)::bigint AS accounted_bytes,
       (memory_bytes - (models_bytes + slots_used * per_request_bytes + system_reserve_bytes
           + (safety_fraction * memory_bytes)::bigint))::bigint AS budget_left_bytes,
       CASE WHEN NOT enabled THEN 'disabled'
            WHEN draining THEN 'draining'
            WHEN health = 'down' THEN 'down'
            WHEN backoff_until > now() THEN 'backoff'
            ELSE health END AS status
FROM acc
ORDER BY name;

CREATE VIEW aibot.slot_usage AS
WITH pairs AS (
    SELECT server_id, model FROM aibot.model_instances
    UNION
    SELECT server_id, model FROM aibot.slots
), sl AS (
    SELECT server_id, model,
           count(*) FILTER (WHERE NOT retired)::bigint        AS slots_total,
           count(*) FILTER (WHERE job_id IS NOT NULL)::bigint AS slots_used
    FROM aibot.slots GROUP BY server_id, model
)
SELECT p.server_id, s.name AS server, p.model,
       coalesce(mi.state, 'absent') AS instance_state,
       mi.size_bytes, mi.parallel, mi.context_length, mi.loaded_at, mi.last_used_at,
       coalesce(sl.slots_used, 0)  AS slots_used,
       coalesce(sl.slots_total, 0) AS slots_total,
       greatest(coalesce(sl.slots_total, 0) - coalesce(sl.slots_used, 0), 0)::bigint AS slots_free
FROM pairs p
JOIN aibot.servers s ON s.id = p.server_id
LEFT JOIN aibot.model_instances mi ON mi.server_id = p.server_id AND mi.model = p.model
LEFT JOIN sl ON sl.server_id = p.server_id AND sl.model = p.model
ORDER BY s.name, p.model;

-- Wait = first claim of the last attempt minus enqueue (started_at when a claim time is missing);
-- latency = finish minus the human's post time (enqueue time when the source gave none).
CREATE VIEW aibot.throughput AS
SELECT w.minutes AS window_minutes,
       count(j.id) FILTER (WHERE j.state IN ('done', 'skipped'))::bigint AS finished,
       count(j.id) FILTER (WHERE j.state = 'done')::bigint              AS replies,
       count(j.id) FILTER (WHERE j.state = 'skipped')::bigint           AS skipped,
       count(j.id) FILTER (WHERE j.state = 'dead')::bigint              AS dead,
       (count(j.id) FILTER (WHERE j.state = 'done'))::double precision / w.minutes AS replies_per_minute,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM coalesce(j.claimed_at, j.started_at) - j.created_at))
           FILTER (WHERE j.state IN ('done', 'skipped')) AS p50_wait_seconds,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM coalesce(j.claimed_at, j.started_at) - j.created_at))
           FILTER (WHERE j.state IN ('done', 'skipped')) AS p95_wait_seconds,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM j.finished_at - coalesce(j.message_at, j.created_at)))
           FILTER (WHERE j.state IN ('done', 'skipped')) AS p50_latency_seconds,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM j.finished_at - coalesce(j.message_at, j.created_at)))
           FILTER (WHERE j.state IN ('done', 'skipped')) AS p95_latency_seconds
FROM (VALUES (5), (60)) AS w (minutes)
LEFT JOIN aibot.jobs j
       ON j.finished_at >= now() - make_interval(mins => w.minutes)
      AND j.state IN ('done', 'skipped', 'dead')
GROUP BY w.minutes
ORDER BY w.minutes;

CREATE VIEW aibot.entity_counts AS
SELECT entity_id,
       count(*) FILTER (WHERE state = 'queued')::bigint    AS queued,
       count(*) FILTER (WHERE state = 'running')::bigint   AS running,
       count(*) FILTER (WHERE state = 'done')::bigint      AS done,
       count(*) FILTER (WHERE state = 'skipped')::bigint   AS skipped,
       count(*) FILTER (WHERE state = 'dead')::bigint      AS dead,
       count(*) FILTER (WHERE state = 'rejected')::bigint  AS rejected,
       count(*) FILTER (WHERE state = 'cancelled')::bigint AS cancelled,
       count(*)::bigint                                    AS total,
       max(finished_at)                                    AS last_finished_at
FROM aibot.jobs
GROUP BY entity_id
ORDER BY entity_id;

CREATE VIEW aibot.worker_status AS
SELECT worker_id, host, pid, role, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::double precision AS heartbeat_age_seconds
FROM aibot.workers
ORDER BY role, worker_id;

-- The shared preamble of the operator functions: lock the job, refuse a missing one or a running one
-- (a running job belongs to its worker until it finishes or its lease expires).
CREATE FUNCTION aibot.lock_job_for_operator(p_id bigint, p_action text) RETURNS aibot.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j aibot.jobs;
BEGIN
    SELECT * INTO j FROM aibot.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', p_id USING ERRCODE = 'no_data_found';
    END IF;
    IF j.state = 'running' THEN
        RAISE EXCEPTION 'job % is running (worker %, lease until %): it cannot be % until it finishes or its lease expires',
            p_id, coalesce(j.worker_id, '?'), coalesce(j.lease_expires_at::text, '?'), p_action
            USING ERRCODE = 'object_in_use';
    END IF;
    RETURN j;
END
$$;

-- Puts a finished job back in the queue with a fresh attempt budget, runnable now. It keeps its rank
-- (so an operator's retry of an old job runs promptly) and any stored reply (so a job that died while
-- delivering is delivered, not generated again). A running job belongs to its worker: refuse.
CREATE FUNCTION aibot.requeue_job(p_id bigint) RETURNS aibot.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j aibot.jobs;
BEGIN
    j := aibot.lock_job_for_operator(p_id, 'requeued');
    IF j.state = 'done' THEN
        RAISE EXCEPTION 'job % is done (its reply was delivered): requeueing it would answer the message twice', p_id
            USING ERRCODE = 'object_in_use';
    END IF;
    IF j.model IS NULL THEN
        RAISE EXCEPTION 'job % has no model (state %, reason: %): fix the entity and send the message again',
            p_id, j.state, coalesce(j.reason, '-') USING ERRCODE = 'object_in_use';
    END IF;
    UPDATE aibot.jobs
       SET state = 'queued', attempts = 0, server_faults = 0, available_at = now(),
           claim_token = NULL, worker_id = NULL, lease_expires_at = NULL,
           finished_at = NULL, reason = NULL
     WHERE id = p_id
    RETURNING * INTO j;
    RETURN j;
END
$$;

-- Marks a job cancelled so nothing will run it; the reason is what operators read later. Finished
-- history (done/skipped) is not rewritten, and a running job belongs to its worker: refuse both.
CREATE FUNCTION aibot.discard_job(p_id bigint, p_reason text DEFAULT NULL) RETURNS aibot.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j aibot.jobs;
BEGIN
    j := aibot.lock_job_for_operator(p_id, 'cancelled');
    IF j.state IN ('done', 'skipped') THEN
        RAISE EXCEPTION 'job % already finished (%): there is nothing to cancel', p_id, j.state
            USING ERRCODE = 'object_in_use';
    END IF;
    UPDATE aibot.jobs
       SET state = 'cancelled', reason = coalesce(nullif(p_reason, ''), 'cancelled by an operator'),
           finished_at = now(), claim_token = NULL, lease_expires_at = NULL
     WHERE id = p_id
    RETURNING * INTO j;
    RETURN j;
END
$$;

-- Live events for `aibot serve` (WebSocket) on channel aibot_events. The payload stays small (ids and
-- state; the listener reads anything else it needs) and the function runs only when the state
-- actually changes (the WHEN clauses), so the hot claim path pays one pg_notify per transition.
CREATE FUNCTION aibot.jobs_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ev text;
    r aibot.jobs;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
        ev := 'deleted';
    ELSE
        r := NEW;
        ev := CASE NEW.state
                  WHEN 'queued' THEN 'queued'
                  WHEN 'running' THEN 'claimed'
                  WHEN 'cancelled' THEN 'deleted'
                  ELSE 'completed' END;
    END IF;
    PERFORM pg_notify('aibot_events', json_build_object(
        'type', ev, 'id', r.id, 'state', r.state, 'server_id', r.server_id,
        'worker', CASE WHEN ev = 'claimed' THEN r.worker_id END,
        'success', CASE WHEN ev = 'completed' THEN r.state IN ('done', 'skipped') END)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON aibot.jobs
    FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION aibot.jobs_notify();
CREATE TRIGGER jobs_notify_state AFTER UPDATE OF state ON aibot.jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION aibot.jobs_notify();
-- Pruning finished rows must not flood the channel: only jobs the dashboard still shows.
CREATE TRIGGER jobs_notify_delete AFTER DELETE ON aibot.jobs
    FOR EACH ROW WHEN (OLD.state IN ('queued', 'running')) EXECUTE FUNCTION aibot.jobs_notify();
