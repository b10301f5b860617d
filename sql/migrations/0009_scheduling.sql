-- Scheduling that uses the whole cluster and starves no one (issue 12).
--
-- model_instances.draining  a victim of a starving model's swap: no new claims (its slots are retired),
--                           its in-flight requests finish, then the loader evicts it
-- dispatch_limits           the cluster-wide cap on generations in flight (queueSettings.maxConcurrentWorkers),
--                           synced from the config by the refresh, read by claim_jobs
-- claim_jobs()              as in 0002, plus the cap: with a cap set, claims are serialised by a
--                           transaction advisory lock and take at most (cap - generations running);
--                           and the slot-aware claim walks each servable model's queue (issue 13, below)

ALTER TABLE aibot.model_instances ADD COLUMN draining boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN aibot.model_instances.draining IS
    'Evicted for a starving model once its requests in flight finish; takes no new claims meanwhile.';

CREATE TABLE aibot.dispatch_limits (
    id                    boolean PRIMARY KEY DEFAULT true CHECK (id),
    max_in_flight         integer CHECK (max_in_flight IS NULL OR max_in_flight >= 1),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
INSERT INTO aibot.dispatch_limits (id, max_in_flight) VALUES (true, NULL);
COMMENT ON TABLE aibot.dispatch_limits IS
    'One row: the cluster-wide cap on generations in flight (NULL = only the slots limit).';

-- The claim walks each servable model's own queue (issue 13, scaling finding 2).
--
-- Until now the slot-aware claim walked the whole backlog in (rank, id) order and filtered by "has a
-- free slot": queued jobs of a model no server holds (a cold model waiting for its load, a model every
-- server refused) that ranked ahead were read again by every claim. With 100k of them a claim took
-- 140 ms (bench/scaling.py, sweep "blocked"); the cost grew with the part of the queue nobody could serve.
--
-- jobs_claimable_model  (model, rank, id) of queued jobs still to generate: a claim reads, per model with a
--                       free slot, only the head of that model's queue
-- jobs_deliverable      (rank, id) of queued jobs holding a stored reply (they need no slot, only a delivery)
-- claim_jobs()          as in 0002 (read its comment) plus the cap above, except how the slot-aware path
--                       finds its candidates: the free slots are counted once per call (one read of
--                       free_slots, not one per candidate model); each servable model's first queued job
--                       is read (one index probe per model); the p_limit + 8 models whose first jobs rank
--                       best are walked further, at most p_limit + min(2 × their free slots, 16) jobs each
--                       (no call claims more than p_limit; the margin covers candidates that concurrent
--                       claimers hold, and is capped so a model on 200 servers is not read 400 jobs deep;
--                       the 8 extra models cover models whose candidates all fail);
--                       those rows and the deliveries' head are merged by (rank, id), and each candidate is
--                       then locked with SKIP LOCKED and re-checked (it may have been claimed since it was
--                       read). The path without slots (p_use_slots = false) is unchanged: jobs_claimable in
--                       order, locked as it is read. A claim also drops the job's "waiting: …" note
--                       (aibot.queue.jobs.note_waiting): a job being served is not waiting.

CREATE INDEX jobs_claimable_model ON aibot.jobs (model, rank, id) WHERE state = 'queued' AND reply IS NULL;
CREATE INDEX jobs_deliverable ON aibot.jobs (rank, id) WHERE state = 'queued' AND reply IS NOT NULL;

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
-- As 0002_queue.sql's claim_jobs (read its comment), plus the cluster-wide cap on generations in
-- flight and the slot-aware candidate walk per model (this file's header). With a cap, every claim call
-- takes one transaction advisory lock first, so two workers can never both see "cap - 1 running" and
-- both claim; without one (the default) no lock is taken. A job with a stored reply only delivers (no
-- generation) and is not capped.
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
            FROM (SELECT fs.model, sum(fs.free)::integer AS free FROM aibot.free_slots fs GROUP BY fs.model) f;
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
                        WHERE j.state = 'queued' AND j.reply IS NULL
                          AND j.model = m.model
                          AND j.available_at <= now()
                        ORDER BY j.rank, j.id
                        LIMIT 1
                    ) head
                    ORDER BY head.rank, head.id
                    LIMIT p_limit + 8
                ) b
                CROSS JOIN LATERAL (
                    SELECT j.id, j.model, j.rank
                    FROM aibot.jobs j
                    WHERE j.state = 'queued' AND j.reply IS NULL
                      AND j.model = b.model
                      AND j.available_at <= now()
                    ORDER BY j.rank, j.id
                    LIMIT least(p_max_scan, p_limit + least(2 * b.free, 16))
                ) h
                UNION ALL
                (SELECT j.id, j.model, j.rank
                 FROM aibot.jobs j
                 WHERE j.state = 'queued' AND j.reply IS NOT NULL
                   AND j.available_at <= now()
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
            WHERE j.state = 'queued'
              AND j.available_at <= now()
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
            WHERE j.id = v_cand.id AND j.state = 'queued' AND j.available_at <= now()
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
            SELECT sl.id, sl.server_id INTO v_slot, v_server
            FROM aibot.slots sl
            JOIN aibot.free_slots f ON f.server_id = sl.server_id AND f.model = sl.model
            WHERE sl.model = v_cand.model
              AND sl.job_id IS NULL
              AND NOT sl.retired
            ORDER BY f.free DESC, sl.server_id, sl.id
            LIMIT 1
            FOR UPDATE OF sl SKIP LOCKED;
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
            -- A claimed job no longer waits: a "waiting: no server can load it" note another process
            -- wrote from an older snapshot (after the loader cleared the notes) must not outlive it.
            last_error = CASE WHEN j.last_error LIKE 'waiting: %' THEN NULL ELSE j.last_error END
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

COMMENT ON FUNCTION aibot.claim_jobs(text, double precision, boolean, integer, integer) IS
    'Claims up to p_limit queued jobs in (rank, id) order with SKIP LOCKED; with p_use_slots each takes a free slot '
    '(candidates read per servable model, then locked one at a time); at most dispatch_limits.max_in_flight '
    'generations run cluster-wide.';
