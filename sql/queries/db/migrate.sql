-- Bookkeeping of applied migrations (aibot.db.migrate).

-- migrations_lock --
-- Serialises concurrent `aibot migrate` runs from several hosts (held to the end of the transaction)
SELECT pg_advisory_xact_lock(7301001);

-- migrations_bootstrap --
-- The bookkeeping table must exist before the first migration can be recorded
CREATE SCHEMA IF NOT EXISTS aibot;
CREATE TABLE IF NOT EXISTS aibot.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- migrations_applied --
-- Versions already applied, with the checksum of the file as it was then
SELECT version, checksum FROM aibot.migrations ORDER BY version;

-- migrations_exists --
-- Whether this database has ever been migrated
SELECT to_regclass('aibot.migrations') IS NOT NULL AS present;

-- migrations_record --
-- Marks one migration applied, in the same transaction as its DDL
INSERT INTO aibot.migrations (version, name, checksum) VALUES (%(version)s, %(name)s, %(checksum)s);
