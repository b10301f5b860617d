-- Scheduling that uses the whole cluster and starves no one (issue 12).
--
-- model_instances.draining  a victim of a starving model's swap: no new claims (its slots are retired),
--                           its in-flight requests finish, then the loader evicts it
-- dispatch_limits           the cluster-wide cap on generations in flight (queueSettings.maxConcurrentWorkers),
--                           synced from the config by the refresh, read by claim_jobs
-- claim_jobs()              as in 0002, plus the cap: with a cap set, claims are serialised by a
--                           transaction advisory lock and take at most (cap - generations running)

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
-- flight. With a cap, every claim call takes one transaction advisory lock first, so two workers can
-- never both see "cap - 1 running" and both claim; without one (the default) nothing changes and no
-- lock is taken. A job with a stored reply only delivers (no generation) and is not capped.
#variable_conflict use_column
DECLARE
    v_models  text[];
    v_cand    record;
    v_slot    bigint;
    v_server  integer;
    v_token   uuid;
    v_taken   integer := 0;
    v_cur     refcursor;
    v_cap     integer;
    v_room    integer;
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
        SELECT coalesce(array_agg(DISTINCT f.model), '{}') INTO v_models FROM aibot.free_slots f;
    END IF;

    -- claim candidates: tests/test_claim_plan.py checks that this walks jobs_claimable
    OPEN v_cur FOR
        SELECT j.id, j.model, j.reply IS NOT NULL AS has_reply
        FROM aibot.jobs j
        WHERE j.state = 'queued'
          AND j.available_at <= now()
          AND (NOT p_use_slots OR j.reply IS NOT NULL OR j.model = ANY (v_models))
        ORDER BY j.rank, j.id
        LIMIT p_max_scan
        FOR UPDATE OF j SKIP LOCKED;

    LOOP
        FETCH v_cur INTO v_cand;
        EXIT WHEN NOT FOUND;

        -- The cap is reached: only deliveries of stored replies may still go.
        CONTINUE WHEN v_room IS NOT NULL AND v_room <= 0 AND NOT v_cand.has_reply;

        v_slot := NULL;
        v_server := NULL;
        IF p_use_slots AND NOT v_cand.has_reply THEN
            SELECT sl.id, sl.server_id INTO v_slot, v_server
            FROM aibot.slots sl
            JOIN aibot.free_slots f ON f.server_id = sl.server_id AND f.model = sl.model
            WHERE sl.model = v_cand.model
              AND sl.job_id IS NULL
              AND NOT sl.retired
            ORDER BY f.free DESC, sl.server_id, sl.id
            LIMIT 1
            FOR UPDATE OF sl SKIP LOCKED;
            -- Its model's slots went to concurrent claims since v_models was read: leave it queued.
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
            server_id = coalesce(v_server, j.server_id)
        WHERE j.id = v_cand.id
        RETURNING j.id, j.claim_token, j.attempts, j.entity_id, j.model, j.priority, j.payload, j.reply,
                  j.server_id, j.lease_expires_at, j.source, j.source_message_id, j.message_at,
                  j.max_attempts, j.server_faults, j.created_at
        INTO job_id, claim_token, attempts, entity_id, model, priority, payload, reply,
             server_id, lease_expires_at, source, source_message_id, message_at,
             max_attempts, server_faults, created_at;
        slot_id := v_slot;
        IF v_room IS NOT NULL AND NOT v_cand.has_reply THEN
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
    'Claims up to p_limit queued jobs in (rank, id) order with SKIP LOCKED; with p_use_slots each takes a free slot; '
    'at most dispatch_limits.max_in_flight generations run cluster-wide.';
