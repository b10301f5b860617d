-- Session settings of aibot's own connections (aibot.db).

-- session_async_commit --
-- A worker session's commits do not wait for the WAL flush (see aibot.worker.Runtime for why that is safe)
SET synchronous_commit = off;
