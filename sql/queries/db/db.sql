-- Session settings of aibot's own connections (aibot.db).

-- session_async_commit --
-- A worker session's commits do not wait for the WAL flush (see aibot.worker.Runtime for why that is safe)
SET synchronous_commit = off;

-- transaction_begin --
-- Opens the transaction of a pipelined block (aibot.db.one_round_trip: BEGIN, its statements and COMMIT in one exchange)
BEGIN;

-- transaction_commit --
-- Commits a pipelined block's transaction
COMMIT;

-- transaction_rollback --
-- Rolls back a pipelined block's transaction (an exception in the block, or a statement that failed)
ROLLBACK;
