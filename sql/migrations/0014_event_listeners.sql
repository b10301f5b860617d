-- Job events are sent only while someone watches them (issue 13: dispatch overhead).
--
-- 0005's triggers sent a pg_notify on every job transition, three per job, whether or not a dashboard
-- was open. A transaction that notifies takes the notification queue's cluster-wide lock at commit
-- and holds it until the commit ends (PostgreSQL src/backend/commands/async.c, PreCommit_Notify:
-- "Serialize writers by acquiring a special lock that we hold till after commit"), so every claim and
-- completion queued behind the others':
-- bench/overhead.py ran at 578 jobs/s before this migration and 683 after (4,000 jobs, 2 × 8 threads,
-- medians of two in one run, docs/benchmarks-overhead.md), and pg_stat_database counted 3.2
-- transactions per job against 1.2.
--
-- event_listeners  one row per `aibot serve` event hub with a live-events subscriber (a dashboard's
--                  WebSocket), renewed while it has one and deleted when the last one leaves
--                  (aibot.web.events.EventHub); an expired row (its process died) counts for nothing.
--                  UNLOGGED: rows that last seconds need no WAL; after a crash the table is empty and
--                  a hub with subscribers writes its row again at its next renewal.
-- jobs_notify()    as in 0005, but sends nothing while no listener is registered: one index probe of a
--                  table of a few rows instead of a notification and its commit-time lock.

CREATE UNLOGGED TABLE aibot.event_listeners (
    listener    text PRIMARY KEY,
    expires_at  timestamptz NOT NULL
);

COMMENT ON TABLE aibot.event_listeners IS
    'Event hubs with a live subscriber (aibot serve); job events are NOTIFYed only while one has not expired.';

CREATE OR REPLACE FUNCTION aibot.jobs_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ev text;
    r aibot.jobs;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM aibot.event_listeners l WHERE l.expires_at > now()) THEN
        RETURN NULL;
    END IF;
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
