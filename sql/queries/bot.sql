-- Named queries of the bot: read cursors, the inbox source, rate-limit events, the replies sink.

-- cursor_get --
-- Where a source's reader left off (absent = never read)
SELECT position FROM cursors WHERE source = %(source)s;

-- cursor_set --
-- Moves a source's read position; runs in the same transaction as the job inserts it covers
INSERT INTO cursors (source, position, updated_at) VALUES (%(source)s, %(position)s, now())
ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, updated_at = now();

-- inbox_after --
-- The next inbox messages after the cursor, oldest first
SELECT id, message FROM inbox WHERE id > %(after)s ORDER BY id LIMIT %(limit)s;

-- inbox_add --
-- Appends one chat message to the Postgres inbox (tests, demos, same-database chat services)
INSERT INTO inbox (message) VALUES (%(message)s) RETURNING id;

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

-- reply_insert --
-- The Postgres sink: stores a reply once; a repeat with the same reply id is a no-op
INSERT INTO replies (reply_id, job_id, reply_to, entity_id, message)
VALUES (%(reply_id)s, %(job_id)s, %(reply_to)s, %(entity_id)s, %(message)s)
ON CONFLICT (reply_id) DO NOTHING;
