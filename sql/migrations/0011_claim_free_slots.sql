-- The slot choice reads a bounded sample of free slots (issue 13: claim cost at 200 servers).
--
-- 0009's claim read the free_slots view twice: it aggregated every free slot row of every usable server to
-- learn which models have free slots (and how many), then, for each candidate, aggregated its model's free
-- slots again per server for the "most free slots" order. Both grow with the cluster: at 200 servers they
-- were the two statements whose time grew (bench/claim_profile.py: 0.09 -> 2.27 ms and 0.06 -> 0.98 ms).
--
-- free_slot_rows  each free, non-retired slot on a usable server whose pair is not blocked: the one place
--                 that says which slot a claim may take; free_slots is now its count per (server, model)
-- model_free_slots  free_slot_rows counted per model: the claim's servable models and the doorbells' supply
--                 (sql/queries/queue/doorbell.sql), one aggregate, not one per (server, model) re-aggregated
-- claim_jobs()    as in 0009 except two reads. The servable models and their free slots come from
--                 model_free_slots.
--                 The slot choice orders the servers among the model's first 16 free slots (by server id) by
--                 their free slots (ties: lowest server id), as 0009 did over all of them: the same choice
--                 while a model has at most 16 free slots; beyond, the most free among the lowest-numbered
--                 servers with free slots, and a server leaves that sample as its slots fill, so work still
--                 spreads. It then locks one slot of the first of them that has one left. The slot choice
--                 costs O(16), not O(the model's slot rows); the servable read is still O(free slot rows).
--
-- bench/README.md ("Scaling") has the figures. Tried and not kept: finding the servable models by a skip
-- scan of slots_free, one model at a time, each counted up to 8 (O(models), not O(slot rows)): faster with
-- 200 servers of 6 models, slower with 200 models, where one model's probes cost more than its rows.

CREATE VIEW aibot.free_slot_rows AS
SELECT sl.id, sl.server_id, sl.model
FROM aibot.slots sl
WHERE sl.job_id IS NULL
  AND NOT sl.retired
  AND sl.server_id IN (SELECT u.id FROM aibot.usable_servers u)
  AND NOT EXISTS (SELECT 1 FROM aibot.blocked_pairs b WHERE b.server_id = sl.server_id AND b.model = sl.model);

COMMENT ON VIEW aibot.free_slot_rows IS
    'Each free, non-retired slot on a usable server whose (server, model) is not blocked: what a claim may take.';

CREATE OR REPLACE VIEW aibot.free_slots AS
SELECT r.server_id, r.model, count(*)::integer AS free
FROM aibot.free_slot_rows r
GROUP BY r.server_id, r.model;

CREATE VIEW aibot.model_free_slots AS
SELECT r.model, count(*)::integer AS free
FROM aibot.free_slot_rows r
GROUP BY r.model;

COMMENT ON VIEW aibot.model_free_slots IS
    'Free slots a claim may take, per model (all servers together): the claim''s servable models, the doorbells'' supply.';

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
-- As 0009_scheduling.sql's claim_jobs (read its comment), except how the slot-aware path reads the free
-- slots: this file's header.
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
                    LIMIT least(p_max_scan, p_limit + 2 * least(b.free, c_free_cap))
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
    '(candidates read per servable model, then locked one at a time; a bounded sample of free slots for the slot choice); at most dispatch_limits.max_in_flight '
    'generations run cluster-wide.';
