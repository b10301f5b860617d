-- Operator queries: `aibot status/top/jobs/servers`, `aibot serve` (JSON, WebSocket, /metrics).
-- Most read the views of migrations/0005_inspection.sql so psql users see the same numbers.

-- ops_queue_depth --
-- Jobs per (state, priority band), critical first
SELECT state::text, band, jobs, runnable FROM queue_depth
ORDER BY array_position(enum_range(NULL::job_state), state), priority_band_order(band);

-- ops_queue_oldest --
-- How long the oldest queued job has waited (one row, NULLs when the queue is empty)
SELECT * FROM queue_oldest;

-- ops_in_flight --
-- Running jobs with worker, server, model and lease time left
SELECT * FROM in_flight;

-- ops_failed_jobs --
-- The most recent dead and rejected jobs with their reasons
SELECT id, state::text, entity_id, model, priority, attempts, max_attempts, server_faults, reason,
       left(last_error, 300) AS last_error, source, source_message_id, created_at, finished_at, server
FROM failed_jobs
LIMIT %(limit)s;

-- ops_server_health --
-- Per server: health, backoff, draining, enabled, memory budget and accounted memory
SELECT * FROM server_health;

-- ops_slot_usage --
-- Slots used/total per (server, model), with the model instance's state and size
SELECT * FROM slot_usage;

-- ops_throughput --
-- Replies per minute and p50/p95 wait and end-to-end latency over the last 5 and 60 minutes
SELECT * FROM throughput;

-- ops_entity_counts --
-- Jobs per entity and state
SELECT * FROM entity_counts;

-- ops_worker_status --
-- Registered processes with their heartbeat age
SELECT * FROM worker_status;

-- ops_jobs_list --
-- Newest jobs first, optionally of one state and/or one entity
SELECT j.id, j.state::text, j.entity_id, j.model, j.priority, priority_band(j.priority) AS band,
       j.attempts, j.max_attempts, j.worker_id, j.server_id, s.name AS server,
       j.created_at, j.claimed_at, j.finished_at, j.available_at, j.reason, j.waiting_reason, left(j.last_error, 300) AS last_error,
       left(coalesce(j.payload->>'text', j.payload->>'message', ''), 200) AS message
FROM jobs j
LEFT JOIN servers s ON s.id = j.server_id
WHERE (%(state)s::text IS NULL OR j.state = %(state)s::job_state)
  AND (%(entity)s::text IS NULL OR j.entity_id = %(entity)s::text)
ORDER BY j.id DESC
LIMIT %(limit)s;

-- ops_job_get --
-- One job with everything an operator may want to read (payload and stored reply included)
SELECT j.id, j.state::text, j.source, j.source_message_id, j.entity_id, j.model, j.priority,
       priority_band(j.priority) AS band, j.rank, j.attempts, j.max_attempts, j.server_faults,
       j.max_server_faults, j.available_at, j.created_at, j.message_at, j.claimed_at, j.worker_id,
       j.lease_expires_at, j.server_id, s.name AS server, j.started_at, j.generated_at, j.delivered_at,
       j.finished_at, j.reason, j.waiting_reason, j.last_error, j.payload, j.reply
FROM jobs j
LEFT JOIN servers s ON s.id = j.server_id
WHERE j.id = %(id)s;

-- ops_requeue_job --
-- Back to queued with a fresh attempt budget; raises for running/done/unknown jobs
SELECT id, state::text FROM requeue_job(%(id)s);

-- ops_discard_job --
-- Cancels a job with a reason; raises for running/finished/unknown jobs
SELECT id, state::text, reason FROM discard_job(%(id)s, %(reason)s);

-- ops_cancel_all_queued --
-- The dashboard's "clear all": cancels every queued job (running ones finish)
UPDATE jobs
   SET state = 'cancelled', reason = %(reason)s, finished_at = now()
 WHERE state = 'queued'
RETURNING id;

-- ops_server_drain --
-- Claims stop taking this server's slots; in-flight work finishes
UPDATE servers SET draining = true, updated_at = now()
 WHERE name = %(name)s
RETURNING id, name, enabled, draining;

-- ops_server_enable --
-- Ends a drain and re-enables the server
UPDATE servers SET draining = false, enabled = true, updated_at = now()
 WHERE name = %(name)s
RETURNING id, name, enabled, draining;

-- ops_server_names --
-- Known server names, to say which ones exist when an operator mistypes one
SELECT name FROM servers ORDER BY name;

-- ops_queue_items --
-- The live queue (running and queued) in claim order, in the original monitor's item shape
SELECT * FROM (SELECT j.id, j.priority, j.entity_id AS entity, j.model, j.state::text,
       left(coalesce(j.payload->>'text', j.payload->>'message', ''), 200) AS message,
       j.payload->>'sender' AS sender,
       j.worker_id AS "claimedBy", j.server_id AS "serverId", s.name AS server,
       (extract(epoch FROM j.created_at) * 1000)::bigint AS timestamp,
       (extract(epoch FROM j.claimed_at) * 1000)::bigint AS "claimedAt",
       j.payload->>'routerReason' AS "routerReason",
       j.attempts, priority_band(j.priority) AS band,
       j.rank
FROM jobs j
LEFT JOIN servers s ON s.id = j.server_id
WHERE CASE WHEN %(ids)s::bigint[] IS NULL THEN j.state IN ('queued', 'running') ELSE j.id = ANY(%(ids)s) END
) items
ORDER BY (state = 'running') DESC, rank, id
LIMIT %(limit)s;

-- ops_monitor_stats --
-- The original monitor's stats (§3.3): counts, bands, waits in ms, throughput
WITH live AS (
    SELECT * FROM jobs WHERE state IN ('queued', 'running')
)
SELECT
    (SELECT count(*) FROM live)                                   AS "totalItems",
    (SELECT count(*) FROM live WHERE state = 'queued')            AS "unclaimedItems",
    (SELECT count(*) FROM live WHERE state = 'running')           AS "claimedItems",
    (SELECT json_build_object(
        'critical',   count(*) FILTER (WHERE priority <= 10),
        'high',       count(*) FILTER (WHERE priority BETWEEN 11 AND 30),
        'medium',     count(*) FILTER (WHERE priority BETWEEN 31 AND 60),
        'low',        count(*) FILTER (WHERE priority BETWEEN 61 AND 90),
        'background', count(*) FILTER (WHERE priority > 90)) FROM live) AS "priorityBands",
    (SELECT coalesce(avg(extract(epoch FROM claimed_at - created_at)) * 1000, 0)::bigint
       FROM live WHERE state = 'running')                         AS "averageWaitTime",
    (SELECT count(*) FROM jobs WHERE state IN ('done', 'skipped')
        AND finished_at >= now() - interval '60 seconds')         AS throughput,
    (SELECT coalesce(extract(epoch FROM now() - min(created_at)) * 1000, 0)::bigint FROM live) AS "oldestItemAge",
    (SELECT count(*) FROM live WHERE state = 'running' AND lease_expires_at < now()) AS "staleClaims",
    (SELECT count(*)::double precision / 60 FROM jobs WHERE state = 'done'
        AND finished_at >= now() - interval '1 hour')             AS "throughputHour",
    (SELECT (extract(epoch FROM max(finished_at)) * 1000)::bigint FROM jobs
      WHERE state = 'done' AND finished_at >= now() - interval '1 day') AS "lastSuccess",
    (SELECT coalesce(avg(extract(epoch FROM coalesce(claimed_at, started_at) - created_at)) * 1000, 0)::bigint
       FROM jobs WHERE state IN ('done', 'skipped') AND finished_at >= now() - interval '1 hour') AS "avgWait";

-- ops_health --
-- Liveness for /health: proves the database answers, with the queue size
SELECT count(*) AS queue_size FROM jobs WHERE state IN ('queued', 'running');

-- ops_replies_per_minute --
-- Replies posted in each of the last N minutes (oldest first, zero-filled), for the dashboard chart
SELECT (extract(epoch FROM m.minute) * 1000)::bigint AS minute, count(j.id) AS replies
FROM generate_series(date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
                     date_trunc('minute', now()), interval '1 minute') AS m (minute)
LEFT JOIN jobs j ON j.state = 'done'
                AND j.finished_at >= m.minute AND j.finished_at < m.minute + interval '1 minute'
GROUP BY m.minute
ORDER BY m.minute;

-- ops_job_durations --
-- Summary of recent finished jobs for /metrics: run time (claim to finish) and end-to-end latency
SELECT q.quantile,
       percentile_cont(q.quantile) WITHIN GROUP (ORDER BY extract(epoch FROM j.finished_at - coalesce(j.claimed_at, j.created_at))) AS run_seconds,
       percentile_cont(q.quantile) WITHIN GROUP (ORDER BY extract(epoch FROM j.finished_at - coalesce(j.message_at, j.created_at))) AS latency_seconds
FROM (VALUES (0.5::double precision), (0.9), (0.99)) AS q (quantile)
LEFT JOIN jobs j ON j.state IN ('done', 'skipped') AND j.finished_at >= now() - make_interval(mins => %(minutes)s)
GROUP BY q.quantile
ORDER BY q.quantile;

-- ops_job_durations_totals --
-- Count and sums for the /metrics summaries over the same window
SELECT count(*) AS count,
       coalesce(sum(extract(epoch FROM finished_at - coalesce(claimed_at, created_at))), 0)::double precision AS run_sum,
       coalesce(sum(extract(epoch FROM finished_at - coalesce(message_at, created_at))), 0)::double precision AS latency_sum
FROM jobs
WHERE state IN ('done', 'skipped') AND finished_at >= now() - make_interval(mins => %(minutes)s);

-- ops_model_loads --
-- Load/unload counts per (server, model, action, outcome) for the /metrics counter
SELECT s.name AS server, l.model, l.action,
       CASE WHEN l.ok THEN 'ok' WHEN l.ok IS NULL THEN 'pending' ELSE 'failed' END AS outcome,
       count(*) AS n
FROM model_loads l
JOIN servers s ON s.id = l.server_id
GROUP BY s.name, l.model, l.action, 4
ORDER BY 1, 2, 3, 4;

-- ops_listen --
-- Subscribes the serve process to the job events of 0005's triggers
LISTEN aibot_events;

-- ops_events_register --
-- This event hub has a live subscriber: the job triggers send events until expires_at (renewed meanwhile)
INSERT INTO event_listeners (listener, expires_at) VALUES (%(listener)s, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (listener) DO UPDATE SET expires_at = EXCLUDED.expires_at;

-- ops_events_unregister --
-- The hub's last subscriber left, or the hub stops; rows of hubs that died long ago go too
DELETE FROM event_listeners WHERE listener = %(listener)s OR expires_at < now() - interval '1 hour';

-- ops_model_queue --
-- Per model with queued jobs or an instance: what waits, the servers serving it (replicas), where it is loading, and why it waits when nowhere
WITH q AS (
    SELECT model, count(*)::bigint AS queued,
           extract(epoch FROM now() - min(created_at))::double precision AS oldest_wait_seconds,
           max(waiting_reason) AS waiting_reason
    FROM jobs WHERE state = 'queued' AND model IS NOT NULL
    GROUP BY model
), r AS (
    SELECT mi.model,
           array_agg(s.name ORDER BY s.name) FILTER (WHERE mi.state = 'loaded' AND u.id IS NOT NULL) AS served_by,
           array_agg(s.name ORDER BY s.name) FILTER (WHERE mi.state = 'loading') AS loading_on
    FROM model_instances mi
    JOIN servers s ON s.id = mi.server_id
    LEFT JOIN usable_servers u ON u.id = s.id
    GROUP BY mi.model
)
SELECT coalesce(q.model, r.model) AS model, coalesce(q.queued, 0) AS queued, q.oldest_wait_seconds,
       coalesce(r.served_by, '{}') AS served_by, coalesce(r.loading_on, '{}') AS loading_on,
       cardinality(coalesce(r.served_by, '{}'))::integer AS replicas, q.waiting_reason
FROM q FULL JOIN r ON r.model = q.model
ORDER BY coalesce(q.queued, 0) DESC, 1;

-- ops_entity_wait --
-- Per persona: jobs queued now, the oldest one's wait, and the median and p95 wait (enqueue to claim) of jobs claimed in the last hour
SELECT entity_id,
       count(*) FILTER (WHERE state = 'queued')::bigint AS queued,
       extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'queued'))::double precision AS oldest_wait_seconds,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - created_at))
           FILTER (WHERE claimed_at > now() - interval '60 minutes') AS p50_wait_seconds,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - created_at))
           FILTER (WHERE claimed_at > now() - interval '60 minutes') AS p95_wait_seconds
FROM jobs
WHERE state = 'queued' OR claimed_at > now() - interval '60 minutes'
GROUP BY entity_id
ORDER BY oldest_wait_seconds DESC NULLS LAST, entity_id;

-- ops_load_timeline --
-- Model loads, unloads (evictions) and failed loads per minute over the last minutes, for the dashboard chart
SELECT date_trunc('minute', started_at) AS minute,
       count(*) FILTER (WHERE action = 'load' AND ok IS DISTINCT FROM false)::bigint AS loads,
       count(*) FILTER (WHERE action = 'unload')::bigint AS unloads,
       count(*) FILTER (WHERE action = 'load' AND ok = false)::bigint AS failed
FROM model_loads
WHERE started_at > now() - make_interval(mins => %(minutes)s)
GROUP BY 1
ORDER BY 1;
