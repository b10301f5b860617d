-- The aibot.inbox source (aibot.bot.sources): messages written into Postgres by another service.

-- inbox_after --
-- The next inbox messages after the cursor, oldest first
SELECT id, message FROM inbox WHERE id > %(after)s ORDER BY id LIMIT %(limit)s;

-- inbox_add --
-- Appends one chat message to the Postgres inbox (tests, demos, same-database chat services)
INSERT INTO inbox (message) VALUES (%(message)s) RETURNING id;
