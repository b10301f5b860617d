-- Why a queued job waits gets its own column, and the runnable rule is stated once.
--
-- jobs.waiting_reason  why a queued job still waits for a server (no server can load its model, and why):
--                  written by the loader (aibot.queue.jobs.note_waiting), cleared when the model is loaded
--                  and by the claim. Until now the note shared last_error under a "waiting: " prefix that
--                  five places had to know (the claim, the loader, the model-queue view, its reader, the
--                  clear), and a note overwrote a previous attempt's real error on the same row.
-- runnable(jobs)   a job a claim may take now: queued, and its available_at has passed. A SQL function of the
--                  row, aibot.runnable(j) (j.runnable where aibot is on the search_path, as in the named
--                  queries and the operator's psql), that the planner inlines (so jobs_claimable and
--                  jobs_claimable_model still serve it: tests/queue/test_claim_plan.py). The claim, the
--                  doorbells' count and the queue views read it; until now each restated the rule.
-- claim_jobs()     as in 0011, reading runnable, and clearing waiting_reason instead of a prefixed last_error.

ALTER TABLE aibot.jobs ADD COLUMN waiting_reason text;
COMMENT ON COLUMN aibot.jobs.waiting_reason IS
    'While queued: why no server serves the job''s model yet (the loader''s note); NULL once it can be or is claimed.';

UPDATE aibot.jobs
SET waiting_reason = CASE WHEN state = 'queued' THEN substr(last_error, length('waiting: ') + 1) END,
    last_error = NULL
WHERE last_error LIKE 'waiting: %';

CREATE FUNCTION aibot.runnable(j aibot.jobs) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT j.state = 'queued' AND j.available_at <= now()
$$;

COMMENT ON FUNCTION aibot.runnable(aibot.jobs) IS
    'A job a claim may take now: queued and due. aibot.runnable(j), or j.runnable on the search_path; inlined by the planner.';

CREATE OR REPLACE FUNCTION aibot.claim_jobs(
    p_worker        text,
    p_lease_seconds double precision,
    p_use_slots     boolean,
    p_limit         integer DEFAULT 1,
    p_max_scan      integer DEFAULT 100
)
RETURNS TABLE (
    job_id            bigint,
    claim_token       uuid,
    attempts          integer,
    entity_id         text,
    model             text,
    priority          smallint,
    payload           jsonb,
    reply             jsonb,
    server_id         integer,
    slot_id           bigint,
    lease_expires_at  timestamptz,
    source            text,
    source_message_id text,
    message_at        timestamptz,
    max_attempts      integer,
    server_faults     integer,
    created_at        timestamptz
)
LANGUAGE plpgsql
AS $$
-- As 0011_claim_free_slots.sql's claim_jobs (and 0009's before it: read their comments), except that the
-- runnable rule is aibot.runnable and a claim clears the job's waiting_reason: this file's header.
#variable_conflict use_column
DECLARE
    v_models    text[] := '{}';
    v_free      integer[] := '{}';
    v_cand      record;
    v_has_reply boolean;
    v_slot      bigint;
    v_server    integer;
    v_token     uuid;
    v_taken     integer := 0;
    v_cur       refcursor;
    v_cap       integer;
    v_room      integer;
    v_pick      record;
    -- The walk reads at most 2 × this many jobs per model beyond p_limit, however many free slots it has.
    c_free_cap   CONSTANT integer := 8;
    -- The slot choice sees at most this many of the model's free slots (the "most free" order among them).
    c_sampled   CONSTANT integer := 16;
BEGIN
    IF p_worker IS NULL OR p_worker = '' THEN
        RAISE EXCEPTION 'claim_jobs: p_worker must be a non-empty worker id';
    END IF;
    IF p_lease_seconds IS NULL OR NOT p_lease_seconds > 0 THEN
        RAISE EXCEPTION 'claim_jobs: p_lease_seconds must be > 0, got %', p_lease_seconds;
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'claim_jobs: p_limit must be >= 1, got %', p_limit;
    END IF;
    IF p_max_scan IS NULL OR p_max_scan < p_limit THEN
        RAISE EXCEPTION 'claim_jobs: p_max_scan must be >= p_limit, got %', p_max_scan;
    END IF;

    SELECT d.max_in_flight INTO v_cap FROM aibot.dispatch_limits d WHERE d.id;
    IF v_cap IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('aibot.dispatch_cap'));
        SELECT v_cap - count(*) INTO v_room FROM aibot.jobs j WHERE j.state = 'running' AND j.reply IS NULL;
    END IF;

    IF p_use_slots THEN
        -- At the cap no generation may start: only the deliveries are candidates.
        IF v_room IS NULL OR v_room > 0 THEN
            SELECT coalesce(array_agg(f.model), '{}'), coalesce(array_agg(f.free), '{}') INTO v_models, v_free
            FROM aibot.model_free_slots f;
        END IF;
        -- claim candidates: tests/queue/test_claim_plan.py checks that this walks jobs_claimable_model
        -- per model and jobs_deliverable
        OPEN v_cur FOR
            SELECT c.id, c.model, NULL::boolean AS has_reply
            FROM (
                SELECT h.id, h.model, h.rank
                FROM (
                    SELECT m.model, m.free
                    FROM unnest(v_models, v_free) AS m(model, free)
                    CROSS JOIN LATERAL (
                        SELECT j.rank, j.id
                        FROM aibot.jobs j
                        WHERE aibot.runnable(j) AND j.reply IS NULL
                          AND j.model = m.model
                        ORDER BY j.rank, j.id
                        LIMIT 1
                    ) head
                    ORDER BY head.rank, head.id
                    LIMIT p_limit + 8
                ) b
                CROSS JOIN LATERAL (
                    SELECT j.id, j.model, j.rank
                    FROM aibot.jobs j
                    WHERE aibot.runnable(j) AND j.reply IS NULL
                      AND j.model = b.model
                    ORDER BY j.rank, j.id
                    LIMIT least(p_max_scan, p_limit + 2 * least(b.free, c_free_cap))
                ) h
                UNION ALL
                (SELECT j.id, j.model, j.rank
                 FROM aibot.jobs j
                 WHERE aibot.runnable(j) AND j.reply IS NOT NULL
                 ORDER BY j.rank, j.id
                 LIMIT p_max_scan)
            ) c
            ORDER BY c.rank, c.id
            LIMIT p_max_scan;
    ELSE
        -- claim candidates: tests/queue/test_claim_plan.py checks that this walks jobs_claimable
        OPEN v_cur FOR
            SELECT j.id, j.model, j.reply IS NOT NULL AS has_reply
            FROM aibot.jobs j
            WHERE aibot.runnable(j)
            ORDER BY j.rank, j.id
            LIMIT p_max_scan
            FOR UPDATE OF j SKIP LOCKED;
    END IF;

    LOOP
        FETCH v_cur INTO v_cand;
        EXIT WHEN NOT FOUND;

        IF p_use_slots THEN
            -- Read unlocked: lock it now, skipping one a concurrent claimer holds, and re-check it is
            -- still claimable (a claim that committed since is visible to this statement).
            SELECT j.reply IS NOT NULL INTO v_has_reply
            FROM aibot.jobs j
            WHERE j.id = v_cand.id AND aibot.runnable(j)
            FOR UPDATE OF j SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
        ELSE
            v_has_reply := v_cand.has_reply;   -- the cursor locked the row as it read it
        END IF;

        -- The cap is reached: only deliveries of stored replies may still go.
        CONTINUE WHEN v_room IS NOT NULL AND v_room <= 0 AND NOT v_has_reply;

        v_slot := NULL;
        v_server := NULL;
        IF p_use_slots AND NOT v_has_reply THEN
            -- slot choice: the server with the most free slots for the model among its first c_sampled
            -- free slots (by server id), then one slot of that server locked by slots_free; a server whose
            -- free slots concurrent claims hold is passed over for the next
            FOR v_pick IN
                SELECT s.server_id
                FROM (SELECT r.server_id FROM aibot.free_slot_rows r
                      WHERE r.model = v_cand.model ORDER BY r.server_id LIMIT c_sampled) s
                GROUP BY s.server_id
                ORDER BY count(*) DESC, s.server_id
            LOOP
                SELECT sl.id, sl.server_id INTO v_slot, v_server
                FROM aibot.slots sl
                WHERE sl.model = v_cand.model AND sl.server_id = v_pick.server_id
                  AND sl.job_id IS NULL AND NOT sl.retired
                ORDER BY sl.id
                LIMIT 1
                FOR UPDATE OF sl SKIP LOCKED;
                EXIT WHEN v_slot IS NOT NULL;
            END LOOP;
            -- Its model's slots went to concurrent claims since the free slots were counted: leave it queued.
            CONTINUE WHEN v_slot IS NULL;
        END IF;

        v_token := gen_random_uuid();
        UPDATE aibot.slots
        SET job_id = v_cand.id, claim_token = v_token, taken_at = now()
        WHERE id = v_slot;

        UPDATE aibot.jobs j
        SET state = 'running',
            attempts = j.attempts + 1,
            claim_token = v_token,
            worker_id = p_worker,
            claimed_at = now(),
            lease_expires_at = now() + make_interval(secs => p_lease_seconds),
            started_at = NULL,
            server_id = coalesce(v_server, j.server_id),
            -- A claimed job no longer waits: a note another process wrote from an older snapshot
            -- (after the loader cleared the notes) must not outlive it.
            waiting_reason = NULL
        WHERE j.id = v_cand.id
        RETURNING j.id, j.claim_token, j.attempts, j.entity_id, j.model, j.priority, j.payload, j.reply,
                  j.server_id, j.lease_expires_at, j.source, j.source_message_id, j.message_at,
                  j.max_attempts, j.server_faults, j.created_at
        INTO job_id, claim_token, attempts, entity_id, model, priority, payload, reply,
             server_id, lease_expires_at, source, source_message_id, message_at,
             max_attempts, server_faults, created_at;
        slot_id := v_slot;
        IF v_room IS NOT NULL AND NOT v_has_reply THEN
            v_room := v_room - 1;
        END IF;
        RETURN NEXT;

        v_taken := v_taken + 1;
        EXIT WHEN v_taken >= p_limit;
    END LOOP;
    CLOSE v_cur;
END;
$$;

-- (its COMMENT, 0011's, stays: CREATE OR REPLACE keeps it)

-- 0012's doorbell count, reading runnable.
CREATE OR REPLACE VIEW aibot.doorbell_wanted AS
WITH counted AS MATERIALIZED (
    -- Each model's runnable jobs are counted only up to its free slots (a LIMIT per model, in the order
    -- of jobs_claimable_model so that the index serves it): the count costs O(free slots), not O(queued
    -- jobs), which a deep backlog would make of every ingest. MATERIALIZED: matchable is read twice
    -- below, and an inlined CTE would be computed twice.
    SELECT coalesce((SELECT sum(d.n) FROM aibot.model_free_slots f
                     CROSS JOIN LATERAL (
                         SELECT count(*) AS n FROM (
                             SELECT 1 FROM aibot.jobs j
                             WHERE aibot.runnable(j) AND j.model = f.model AND j.reply IS NULL
                             ORDER BY j.rank, j.id
                             LIMIT f.free) due) d), 0)::int
         + (SELECT count(*) FROM aibot.jobs j WHERE aibot.runnable(j) AND j.reply IS NOT NULL)::int AS matchable
)
SELECT c.matchable,
       CASE WHEN c.matchable > 0 THEN c.matchable
            WHEN EXISTS (
                -- The models with queued work, one index probe each (a loose scan of jobs_claimable_model),
                -- not every queued job: with a deep backlog and every slot busy, this runs on every ring.
                WITH RECURSIVE queued_models(model) AS (
                    (SELECT j.model FROM aibot.jobs j
                     WHERE j.state = 'queued' AND j.reply IS NULL AND j.model IS NOT NULL
                     ORDER BY j.model LIMIT 1)
                    UNION ALL
                    SELECT (SELECT j.model FROM aibot.jobs j
                            WHERE j.state = 'queued' AND j.reply IS NULL AND j.model > q.model
                            ORDER BY j.model LIMIT 1)
                    FROM queued_models q WHERE q.model IS NOT NULL
                )
                SELECT 1 FROM queued_models q
                WHERE q.model IS NOT NULL
                  AND NOT EXISTS (
                      SELECT 1 FROM aibot.model_instances mi JOIN aibot.usable_servers u ON u.id = mi.server_id
                      WHERE mi.model = q.model AND mi.state IN ('loaded', 'loading'))
                  AND EXISTS (
                      SELECT 1 FROM aibot.jobs j
                      WHERE aibot.runnable(j) AND j.model = q.model AND j.reply IS NULL)) THEN 1
            ELSE 0 END AS wanted
FROM counted c;


-- 0005's queue views, reading runnable.
CREATE OR REPLACE VIEW aibot.queue_depth AS
SELECT j.state,
       aibot.priority_band(j.priority) AS band,
       count(*)::bigint                AS jobs,
       count(*) FILTER (WHERE aibot.runnable(j))::bigint AS runnable
FROM aibot.jobs j
GROUP BY j.state, aibot.priority_band(j.priority)
ORDER BY j.state, aibot.priority_band_order(aibot.priority_band(j.priority));

CREATE OR REPLACE VIEW aibot.queue_oldest AS
SELECT count(*)::bigint                                                  AS queued,
       count(*) FILTER (WHERE aibot.runnable(j))::bigint                        AS runnable,
       min(j.created_at)                                                 AS oldest_created_at,
       extract(epoch FROM now() - min(j.created_at))::double precision  AS oldest_wait_seconds,
       extract(epoch FROM now() - min(j.created_at) FILTER (WHERE aibot.runnable(j)))::double precision
                                                                         AS oldest_runnable_wait_seconds
FROM aibot.jobs j
WHERE j.state = 'queued';
