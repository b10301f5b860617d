-- Queue functions for aibot.jobs: the capacity-aware claim and the slot bookkeeping that must hold
-- whichever path (worker, scheduler, operator SQL) moves a job out of `running`.
--
-- usable_servers  servers a claim may send work to (enabled, not draining, not down, not backed off)
-- free_slots      free, non-retired slots per (server, model) on usable servers
-- claim_jobs()    takes up to p_limit jobs in priority order, each with a slot when p_use_slots
-- jobs_free_slot  trigger: a job leaving `running` (or deleted while running) gives its slot back,
--                 and a retired slot is deleted instead of being freed

CREATE VIEW aibot.usable_servers AS
SELECT s.id
FROM aibot.servers s
WHERE s.enabled
  AND NOT s.draining
  AND s.health <> 'down'
  AND (s.backoff_until IS NULL OR s.backoff_until <= now());

COMMENT ON VIEW aibot.usable_servers IS
    'Servers a claim may send new work to: enabled, not draining, not down, not backed off.';

CREATE VIEW aibot.free_slots AS
SELECT sl.server_id, sl.model, count(*)::integer AS free
FROM aibot.slots sl
WHERE sl.job_id IS NULL
  AND NOT sl.retired
  AND sl.server_id IN (SELECT u.id FROM aibot.usable_servers u)
GROUP BY sl.server_id, sl.model;

COMMENT ON VIEW aibot.free_slots IS
    'Free, non-retired slots per (server, model) on usable servers: what a slot-aware claim can take now.';

-- A queue table churns: every job is inserted, updated 2-3 times and later deleted, and no update is
-- HOT (state is in the partial indexes' predicates). Vacuum and analyze it far more often than the
-- defaults (20 % / 10 % of the table) so dead entries at the head of jobs_claimable are cleaned and the
-- planner's statistics keep the claim on that index.
ALTER TABLE aibot.jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
-- No other index on queued rows on purpose: a second partial index WHERE state = 'queued' (e.g. on
-- available_at) lets the planner, on stale statistics, pick it plus a sort over the whole backlog.


CREATE FUNCTION aibot.claim_jobs(
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
-- One call = one short transaction (the caller's). Candidates come from the jobs_claimable index in
-- (rank, id) order and are locked one FETCH at a time with SKIP LOCKED, so concurrent claimers
-- neither wait for each other nor lock more rows than they inspect. With p_use_slots, candidates are
-- first narrowed to models that have a free slot somewhere (so a job for an unloaded model does not
-- block the ones behind it), and each candidate then takes a free slot on the usable server with the
-- most free slots for its model; a job with a stored reply (delivery retry) needs no slot.
-- p_max_scan bounds how many candidates one call locks and inspects.
#variable_conflict use_column
DECLARE
    v_models  text[];
    v_cand    record;
    v_slot    bigint;
    v_server  integer;
    v_token   uuid;
    v_taken   integer := 0;
    v_cur     refcursor;
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
        RETURN NEXT;

        v_taken := v_taken + 1;
        EXIT WHEN v_taken >= p_limit;
    END LOOP;
    CLOSE v_cur;
END;
$$;

COMMENT ON FUNCTION aibot.claim_jobs(text, double precision, boolean, integer, integer) IS
    'Claims up to p_limit queued jobs in (rank, id) order with SKIP LOCKED; with p_use_slots each takes a free slot.';


CREATE FUNCTION aibot.jobs_free_slot() RETURNS trigger
LANGUAGE plpgsql
AS $$
-- A slot is the right to one in-flight request; once its job is no longer running the right must
-- return to the pool whatever moved the job (complete, fail, release, reclaim, cancel, operator SQL).
BEGIN
    DELETE FROM aibot.slots WHERE job_id = OLD.id AND retired;
    UPDATE aibot.slots SET job_id = NULL, claim_token = NULL, taken_at = NULL WHERE job_id = OLD.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_free_slot_on_update
    AFTER UPDATE OF state ON aibot.jobs
    FOR EACH ROW
    WHEN (OLD.state = 'running' AND NEW.state <> 'running')
    EXECUTE FUNCTION aibot.jobs_free_slot();

CREATE TRIGGER jobs_free_slot_on_delete
    AFTER DELETE ON aibot.jobs
    FOR EACH ROW
    WHEN (OLD.state = 'running')
    EXECUTE FUNCTION aibot.jobs_free_slot();
