-- The capacity plan (aibot.cluster.plan): live worker hosts.

-- cluster_worker_hosts --
-- Hosts with live worker processes, for `aibot plan`'s per-host Dramatiq command
SELECT host, count(*)::integer AS processes, max(heartbeat_at) AS heartbeat_at
FROM workers
WHERE role = 'worker' AND heartbeat_at > now() - make_interval(secs => %(live_seconds)s)
GROUP BY host
ORDER BY host;
