-- Per-entity rate limits enforced at claim time (aibot.queue.ratelimit), over aibot.rate_events.

-- rate_lock --
-- Serialises rate-limit decisions for one entity across every process (held to the end of the transaction)
SELECT pg_advisory_xact_lock(hashtext('aibot.rate:' || %(entity_id)s));

-- rate_now --
-- The database clock, read after taking the lock (not now(), the transaction start) so it is later than every event already recorded
SELECT clock_timestamp() AS now;

-- rate_event_for_job --
-- An existing reservation of this job (a repeated reserve must not count twice)
SELECT at FROM rate_events WHERE job_id = %(job_id)s;

-- rate_events_since --
-- Post times of one entity inside the longest window, oldest first
SELECT at FROM rate_events WHERE entity_id = %(entity_id)s AND at > %(since)s ORDER BY at;

-- rate_event_add --
-- Records one reserved post for an entity
INSERT INTO rate_events (entity_id, at, job_id) VALUES (%(entity_id)s, %(at)s, %(job_id)s);

-- rate_event_cancel --
-- Gives a reservation back (the job was skipped or failed, so nothing was posted)
DELETE FROM rate_events WHERE job_id = %(job_id)s;

-- rate_events_prune --
-- Drops events older than every window (the scheduler's housekeeping)
DELETE FROM rate_events WHERE at < now() - make_interval(secs => %(older_than_seconds)s);
