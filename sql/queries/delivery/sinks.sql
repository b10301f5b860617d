-- The Postgres sink (aibot.delivery.sinks): replies into aibot.replies, idempotent by reply id.

-- reply_insert --
-- The Postgres sink: stores a reply once; a repeat with the same reply id is a no-op
INSERT INTO replies (reply_id, job_id, reply_to, entity_id, message)
VALUES (%(reply_id)s, %(job_id)s, %(reply_to)s, %(entity_id)s, %(message)s)
ON CONFLICT (reply_id) DO NOTHING;
