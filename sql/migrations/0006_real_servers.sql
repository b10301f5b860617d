-- What real servers need that the first schema assumed away (issue 10).
--
-- model_instances.instance_id  the server's own name for the loaded instance (LM Studio `key` or
--                              `key:2`, Ollama `name:latest`, a router preset): requests are sent to it
--                              and unloads name it. The row stays keyed by the configured model name,
--                              so a naming difference never deletes a row or drops its slots.
-- model_instances.instances    how many instances of the model the server holds (LM Studio adds
--                              `key:2` on a second load); their memory counts, requests go to one
-- model_instances.origin       'aibot' (our loader loaded it) or 'server' (the server loaded it by
--                              itself: llama.cpp autoload, LM Studio JIT, someone else's `lms load`)
-- model_instances.ttl_seconds  the server unloads it on its own after this long idle (LM Studio JIT)
-- model_instances.state        + 'sleeping' (llama.cpp router: resident, wakes on the next request)
-- servers.catalogue_fingerprint the offered names at the last refresh: a permanent refusal is retried
--                              only when this (or the configuration) changes
-- servers.max_loaded           models the server keeps before evicting the least recently used one
--                              itself (router --models-max, OLLAMA_MAX_LOADED_MODELS, LM Studio JIT)
-- servers.probed_at, recovered_at  probe cadence while down, and the flap window (aibot.health)
-- model_health                 per (server, model): a permanent refusal with its reason, and the
--                              shared backoff of faults that belong to the model, not the server
-- model_catalog.size_source    where a model's size came from ('server <name>', 'config')
-- free_slots                   now also skips pairs that are backed off or refused

ALTER TABLE aibot.model_instances
    ADD COLUMN instance_id text,
    ADD COLUMN instances integer NOT NULL DEFAULT 1 CHECK (instances >= 1),
    ADD COLUMN origin text NOT NULL DEFAULT 'aibot' CHECK (origin IN ('aibot', 'server')),
    ADD COLUMN ttl_seconds double precision;
ALTER TABLE aibot.model_instances DROP CONSTRAINT model_instances_state_check;
ALTER TABLE aibot.model_instances
    ADD CONSTRAINT model_instances_state_check CHECK (state IN ('loading', 'loaded', 'sleeping', 'unloading'));

ALTER TABLE aibot.servers
    ADD COLUMN catalogue_fingerprint text,
    ADD COLUMN max_loaded integer CHECK (max_loaded >= 1),
    ADD COLUMN configured_max_loaded integer CHECK (configured_max_loaded >= 1),
    ADD COLUMN probed_at timestamptz,
    ADD COLUMN recovered_at timestamptz;

ALTER TABLE aibot.model_catalog
    ADD COLUMN size_source text;

CREATE TABLE aibot.model_health (
    server_id              integer NOT NULL REFERENCES aibot.servers (id) ON DELETE CASCADE,
    model                  text NOT NULL,
    unavailable_reason     text,          -- set: this server will not serve this model until something changes
    unavailable_catalogue  text,          -- servers.catalogue_fingerprint when it was refused
    unavailable_config     text,          -- the configuration's fingerprint when it was refused
    failure_count          integer NOT NULL DEFAULT 0,
    backoff_level          integer NOT NULL DEFAULT 0,
    backoff_until          timestamptz,
    recovered_at           timestamptz,
    last_error             text,
    updated_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server_id, model)
);

COMMENT ON TABLE aibot.model_health IS
    'Per (server, model): permanent refusals (retried only after the config or the server''s model list changes) '
    'and the backoff of model-level faults (a failed load, cut streams), which leave the server''s other models alone.';

-- The one escalation rule of every shared backoff (servers and pairs): the first trip, and a trip
-- after a recovery that held for the flap window, are level 1 (delay: backoff_seconds(level - 1));
-- a trip soon after a recovery (flapping), or with no recovery since the last trip (still failing),
-- goes one level up.
CREATE FUNCTION aibot.next_backoff_level(
    p_level         integer,
    p_backoff_until timestamptz,
    p_recovered_at  timestamptz,
    p_flap_seconds  double precision
) RETURNS integer
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_backoff_until IS NULL AND p_recovered_at IS NULL THEN 1
                WHEN p_backoff_until IS NULL
                     AND p_recovered_at <= now() - make_interval(secs => p_flap_seconds) THEN 1
                ELSE greatest(p_level, 0) + 1 END
$$;

COMMENT ON FUNCTION aibot.next_backoff_level(integer, timestamptz, timestamptz, double precision) IS
    'Backoff level of a new trip: 1 for a first or isolated trip, one up when flapping or still failing.';

-- A pair a claim must not use now: refused for good, or backed off.
CREATE VIEW aibot.blocked_pairs AS
SELECT mh.server_id, mh.model,
       CASE WHEN mh.unavailable_reason IS NOT NULL THEN 'unavailable' ELSE 'backoff' END AS why,
       coalesce(mh.unavailable_reason, mh.last_error) AS reason,
       mh.backoff_until
FROM aibot.model_health mh
WHERE mh.unavailable_reason IS NOT NULL OR mh.backoff_until > now();

COMMENT ON VIEW aibot.blocked_pairs IS
    '(server, model) pairs claims and loads skip: refused permanently (why = unavailable) or backed off.';

CREATE OR REPLACE VIEW aibot.free_slots AS
SELECT sl.server_id, sl.model, count(*)::integer AS free
FROM aibot.slots sl
WHERE sl.job_id IS NULL
  AND NOT sl.retired
  AND sl.server_id IN (SELECT u.id FROM aibot.usable_servers u)
  AND NOT EXISTS (SELECT 1 FROM aibot.blocked_pairs b WHERE b.server_id = sl.server_id AND b.model = sl.model)
GROUP BY sl.server_id, sl.model;

-- The last successful load of each (server, model): its duration scales the model's minimum residency
-- (aibot.placement.min_residency).
CREATE INDEX model_loads_last_ok ON aibot.model_loads (server_id, model, finished_at DESC) WHERE action = 'load' AND ok;
