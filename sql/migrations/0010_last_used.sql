-- A model's "last used" moves when one of its slots is used (issue 15, finding 5).
--
-- model_instances.last_used_at was written only by a load, so `aibot models list`'s LAST USED (and the
-- LRU order eviction sorts by, aibot.cluster.placement.evictable) stayed at the load time forever.
--
-- slots.last_used_at  when the slot was last taken by a claim or given back, set by a BEFORE UPDATE
--                     trigger on the slot row itself: the claim and the release already update that
--                     row, so this costs no extra row lock and no write to the (hot, shared)
--                     model_instances row, and it holds whichever function takes or frees slots.
-- slot_usage          last_used_at = the later of the instance's load/use time and its slots' last use.
--
-- A retired slot that is deleted on release takes its time with it; the pair's other slots keep theirs.

ALTER TABLE aibot.slots ADD COLUMN last_used_at timestamptz;

COMMENT ON COLUMN aibot.slots.last_used_at IS
    'When a claim last took this slot or a job last gave it back (trigger slots_mark_used); NULL = never used.';

CREATE FUNCTION aibot.slots_mark_used() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.job_id IS DISTINCT FROM OLD.job_id THEN
        NEW.last_used_at := now();
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER slots_mark_used BEFORE UPDATE OF job_id ON aibot.slots
    FOR EACH ROW EXECUTE FUNCTION aibot.slots_mark_used();

CREATE OR REPLACE VIEW aibot.slot_usage AS
WITH pairs AS (
    SELECT server_id, model FROM aibot.model_instances
    UNION
    SELECT server_id, model FROM aibot.slots
), sl AS (
    SELECT server_id, model,
           count(*) FILTER (WHERE NOT retired)::bigint        AS slots_total,
           count(*) FILTER (WHERE job_id IS NOT NULL)::bigint AS slots_used,
           max(last_used_at)                                  AS last_used_at
    FROM aibot.slots GROUP BY server_id, model
)
SELECT p.server_id, s.name AS server, p.model,
       coalesce(mi.state, 'absent') AS instance_state,
       mi.size_bytes, mi.parallel, mi.context_length, mi.loaded_at,
       greatest(mi.last_used_at, sl.last_used_at) AS last_used_at,
       coalesce(sl.slots_used, 0)  AS slots_used,
       coalesce(sl.slots_total, 0) AS slots_total,
       greatest(coalesce(sl.slots_total, 0) - coalesce(sl.slots_used, 0), 0)::bigint AS slots_free
FROM pairs p
JOIN aibot.servers s ON s.id = p.server_id
LEFT JOIN aibot.model_instances mi ON mi.server_id = p.server_id AND mi.model = p.model
LEFT JOIN sl ON sl.server_id = p.server_id AND sl.model = p.model
ORDER BY s.name, p.model;
