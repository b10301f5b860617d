-- `aibot demo`: set-up of its own database and the records its report is computed from.

-- demo_lock --
-- One demo per database server at a time (held on the maintenance connection for the whole run)
SELECT pg_try_advisory_lock(hashtext('aibot.demo')) AS locked;

-- demo_drop_database --
-- A fresh demo database each run ({database} is a quoted identifier filled in by the caller)
DROP DATABASE IF EXISTS {database} WITH (FORCE);

-- demo_create_database --
-- The demo's own database on the embedded server ({database}: quoted identifier)
CREATE DATABASE {database};

-- demo_schema_present --
-- Whether aibot's tables exist yet (before migrating a database the user named)
SELECT to_regclass('aibot.jobs') IS NOT NULL AS present;

-- demo_existing_rows --
-- Jobs and servers already in a database the user named: the demo refuses to mix with a deployment
SELECT (SELECT count(*) FROM aibot.jobs) AS jobs, (SELECT count(*) FROM aibot.servers) AS servers;

-- demo_jobs --
-- Every job with epoch-second timestamps and its server's name, for the final report
SELECT j.id, j.source_message_id, j.entity_id, j.model, j.state::text AS state, j.priority, j.attempts,
       extract(epoch FROM j.created_at)::float8 AS created_at,
       extract(epoch FROM j.claimed_at)::float8 AS claimed_at,
       extract(epoch FROM j.finished_at)::float8 AS finished_at,
       s.name AS server, j.payload, j.reply ->> 'text' AS reply_text
FROM aibot.jobs j LEFT JOIN aibot.servers s ON s.id = j.server_id
ORDER BY j.id;

-- demo_job_states --
-- Jobs per state and how many queued ones are due now, for the live progress line
SELECT state::text AS state, count(*)::int AS jobs,
       count(*) FILTER (WHERE j.runnable)::int AS runnable
FROM aibot.jobs j GROUP BY state;

-- demo_message_states --
-- Final states reached by the jobs of the given chat message ids (to know when the demo has drained)
SELECT count(*)::int AS jobs,
       count(*) FILTER (WHERE state IN ('done', 'skipped', 'dead', 'rejected', 'cancelled'))::int AS finished,
       count(*) FILTER (WHERE state = 'done')::int AS done,
       count(DISTINCT source_message_id)::int AS messages
FROM aibot.jobs WHERE source_message_id = ANY(%(ids)s);
