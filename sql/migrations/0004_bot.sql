-- Bot extras.
-- A job holds at most one rate-limit reservation: a repeated reserve (worker retry after a crash)
-- finds it instead of counting the post twice, and cancel finds it without a scan.
CREATE UNIQUE INDEX rate_events_job ON aibot.rate_events (job_id) WHERE job_id IS NOT NULL;
