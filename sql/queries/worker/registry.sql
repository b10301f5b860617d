-- The registry of live aibot processes (aibot.worker.registry), over aibot.workers.

-- worker_register --
-- Makes every process visible (the original bot twice had a stray second process nobody could see)
INSERT INTO workers (worker_id, host, pid, role, info)
VALUES (%(worker_id)s, %(host)s, %(pid)s, %(role)s, %(info)s)
ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now(), info = EXCLUDED.info;

-- worker_heartbeat --
-- Liveness of a worker process
UPDATE workers SET heartbeat_at = now() WHERE worker_id = %(worker_id)s;

-- worker_unregister --
-- Clean exit
DELETE FROM workers WHERE worker_id = %(worker_id)s;

-- workers_prune --
-- Forget processes that stopped heartbeating long ago (crashed or killed -9)
DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => %(older_than_seconds)s);

-- workers_on_host --
-- The worker processes registered from one host, for a supervisor to find those that died under it
SELECT worker_id, pid FROM workers WHERE host = %(host)s AND role = 'worker';
