-- Statements used only by bench/overhead.py, bench/real_inference.py and bench/baselines/ (parsed with
-- aibot.db.queries.parse_query_file). Schema-qualified: the benchmarks connect without aibot's search_path.

-- bench_xact_counts --
-- Server-side commits and row changes of one database: transactions per job, measured, not estimated
SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched
FROM pg_stat_database WHERE datname = current_database();

-- bench_aibot_open --
-- Jobs not finished yet (queued or running): zero means the run is over
SELECT count(*)::int AS n FROM aibot.jobs WHERE state IN ('queued', 'running');

-- bench_aibot_states --
-- Final states, to check every job was done exactly once
SELECT state::text AS state, count(*)::int AS n FROM aibot.jobs GROUP BY 1 ORDER BY 1;

-- bench_aibot_replies --
-- Replies in the postgres sink, and how many jobs got more than one
SELECT count(*)::int AS replies, count(DISTINCT job_id)::int AS jobs FROM aibot.replies;

-- bench_aibot_workers --
-- Worker processes that finished booting (Lifecycle registers them)
SELECT count(*)::int AS n FROM aibot.workers WHERE role = 'worker';

-- bench_dramatiq_open --
-- Messages of a queue not acknowledged yet (acked messages are deleted by dramatiq-postgres)
SELECT count(*)::int AS n FROM dramatiq.queue WHERE queue_name = %(queue)s;

-- bench_dramatiq_workers --
-- dramatiq-postgres consumer processes that have polled at least once (heartbeat rows)
SELECT count(*)::int AS n FROM dramatiq.worker;

-- bench_procrastinate_open --
-- Procrastinate jobs not finished yet
SELECT count(*)::int AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing');

-- bench_procrastinate_workers --
-- Procrastinate worker processes registered (3.x keeps a worker table with heartbeats)
SELECT count(*)::int AS n FROM procrastinate_workers;

-- bench_pgqueuer_open --
-- PgQueuer jobs not finished yet (finished jobs are deleted and logged)
SELECT count(*)::int AS n FROM pgqueuer;

-- bench_aibot_slot_total --
-- Slot rows the rebalancer made (the benchmark sizes the loopback server to processes x threads)
SELECT count(*)::int AS n FROM aibot.slots WHERE NOT retired;

-- bench_aibot_span_since --
-- First claim to last completion of the measured jobs (ids after the warm-up), on the database clock
SELECT extract(epoch FROM max(finished_at) - min(claimed_at))::float8 AS seconds
FROM aibot.jobs WHERE id > %(after)s;

-- bench_aibot_per_worker --
-- How the measured jobs spread over worker processes (doorbells decide which process works)
SELECT worker_id, count(*)::int AS n FROM aibot.jobs WHERE id > %(after)s GROUP BY 1 ORDER BY 2 DESC;

-- bench_whatif_claim --
-- What-if (not product code): the product's slot-aware claim, sent as one autocommit statement
SELECT * FROM aibot.claim_jobs(%(worker_id)s, %(lease_seconds)s::double precision, true, 1, 100);

-- bench_whatif_finish --
-- What-if (not product code): store the reply, deliver it to the postgres sink and complete the job in
-- one autocommit statement, fenced by the claim token exactly like jobs_complete
WITH done AS (
    UPDATE aibot.jobs
    SET state = 'done', reply = %(reply)s::jsonb, generated_at = now(), finished_at = now(),
        delivered_at = now(), lease_expires_at = NULL
    WHERE id = %(job_id)s AND claim_token = %(token)s AND state = 'running'
    RETURNING id
)
INSERT INTO aibot.replies (reply_id, job_id, reply_to, entity_id, message)
SELECT %(reply_id)s, done.id, %(reply_to)s, %(entity_id)s, %(message)s FROM done
ON CONFLICT (reply_id) DO NOTHING
RETURNING job_id;

-- bench_leftover_databases --
-- Scratch databases of this benchmark process left behind when Postgres restarted mid-run
SELECT datname FROM pg_database WHERE datname LIKE %(pattern)s;

-- bench_aibot_server_gaps --
-- Per server, the time from one generation's end (generated_at) to the start of the next one there
-- (started_at), among the given jobs: how long a server sat idle between two requests (with more than
-- one slot per server the generations overlap and the values go negative)
SELECT s.name AS server, count(*)::int AS gaps,
       (percentile_cont(0.5) WITHIN GROUP (ORDER BY g.gap) * 1000)::float8 AS p50_ms,
       (percentile_cont(0.9) WITHIN GROUP (ORDER BY g.gap) * 1000)::float8 AS p90_ms
FROM (SELECT j.server_id,
             extract(epoch FROM j.started_at - lag(j.generated_at) OVER (PARTITION BY j.server_id
                                                                         ORDER BY j.started_at)) AS gap
      FROM aibot.jobs j WHERE j.id = ANY(%(ids)s)) g
JOIN aibot.servers s ON s.id = g.server_id
WHERE g.gap IS NOT NULL
GROUP BY s.name ORDER BY s.name;
