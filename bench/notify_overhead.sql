-- Statements used only by bench/notify_overhead.py (parsed with aibot.db.queries.parse_query_file).

-- bench_triggers_off --
-- Claims and completions without the NOTIFY trigger (the baseline)
ALTER TABLE aibot.jobs DISABLE TRIGGER jobs_notify_state;

-- bench_triggers_on --
-- The production setting: one pg_notify per state change
ALTER TABLE aibot.jobs ENABLE TRIGGER jobs_notify_state;

-- bench_insert_off --
-- Inserting the backlog is not what is measured: keep its notifies out of the listener's way
ALTER TABLE aibot.jobs DISABLE TRIGGER jobs_notify_insert;

-- bench_reset --
-- A fresh backlog for the next round
TRUNCATE aibot.jobs;
