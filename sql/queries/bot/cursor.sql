-- Where each chat source's reader left off (aibot.bot.cursor).

-- cursor_get --
-- Where a source's reader left off (absent = never read)
SELECT position FROM cursors WHERE source = %(source)s;

-- cursor_set --
-- Moves a source's read position; runs in the same transaction as the job inserts it covers
INSERT INTO cursors (source, position, updated_at) VALUES (%(source)s, %(position)s, now())
ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, updated_at = now();
