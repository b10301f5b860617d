-- The durable state of aibot. Everything lives in schema `aibot`.
--
-- jobs            one LLM reply to produce for one (source, source message id, entity)
-- servers         LLM servers (LM Studio, llama.cpp, Ollama, OpenAI-compatible) and their shared health/backoff
-- model_instances models resident (or loading/unloading) on each server
-- slots           one row per request a (server, model) may have in flight; a job holds at most one
-- workers         registration + heartbeat of every worker process, so strays are visible
-- cursors         read positions of the bot's sources, so a restart neither re-answers nor skips
-- rate_events     posts per entity, for sliding-window rate limits shared by all processes
-- inbox, replies  Postgres source and sink (used when the chat lives in the same database)
-- scheduler_ticks one row per (scheduled job, tick), so each tick runs once cluster-wide
-- model_loads     history of loads/unloads, for metrics and the single-flight proof

CREATE SCHEMA IF NOT EXISTS aibot;

CREATE TYPE aibot.job_state AS ENUM (
    'queued',     -- waiting; claimable once available_at has passed
    'running',    -- claimed: a worker holds the lease (claim_token, lease_expires_at)
    'done',       -- reply accepted by the sink
    'skipped',    -- the model answered [SKIP] or the reply was empty after post-processing
    'dead',       -- gave up: attempts or server-fault budget exhausted
    'rejected',   -- never runnable: bad input, unknown/disabled entity (reason says which)
    'cancelled'   -- an operator cancelled it
);

CREATE TABLE aibot.jobs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source              text NOT NULL,                 -- e.g. 'chat', 'inbox', 'stdin'
    source_message_id   text NOT NULL,
    entity_id           text NOT NULL,
    model               text,                          -- resolved model key; NULL only for rejected rows
    priority            smallint NOT NULL CHECK (priority BETWEEN 0 AND 99),
    -- Claim order. rank = epoch(created_at) + priority * aging_seconds: FIFO within a priority, and a
    -- lower priority overtakes a higher one after waiting (difference in priority) * aging_seconds.
    -- Static per row, so the claim can walk an index instead of sorting the whole backlog.
    rank                double precision NOT NULL,
    state               aibot.job_state NOT NULL DEFAULT 'queued',
    payload             jsonb NOT NULL DEFAULT '{}',   -- message, context, ais, model override, ...
    attempts            integer NOT NULL DEFAULT 0,    -- claims that counted against max_attempts
    max_attempts        integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    server_faults       integer NOT NULL DEFAULT 0,    -- failures blamed on a server, not the job
    max_server_faults   integer NOT NULL DEFAULT 20,
    available_at        timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    message_at          timestamptz,                   -- when the human posted, if the source says
    claimed_at          timestamptz,
    claim_token         uuid,                          -- fencing token of the current claim
    worker_id           text,
    lease_expires_at    timestamptz,
    server_id           integer,                       -- server of the current/last attempt
    started_at          timestamptz,                   -- first byte sent to the LLM server (last attempt)
    generated_at        timestamptz,
    reply               jsonb,                         -- stored reply; a re-claim delivers it without generating
    delivered_at        timestamptz,
    finished_at         timestamptz,
    last_error          text,
    reason              text,                          -- why rejected/skipped/dead/cancelled
    UNIQUE (source, source_message_id, entity_id)
);

-- Exactly the claimable rows, in claim order.
CREATE INDEX jobs_claimable ON aibot.jobs (rank, id) WHERE state = 'queued';
-- Lease reclaim scans only running rows.
CREATE INDEX jobs_running_lease ON aibot.jobs (lease_expires_at) WHERE state = 'running';
-- Prune and the finished-job views.
CREATE INDEX jobs_finished ON aibot.jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE aibot.servers (
    id                  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                text NOT NULL UNIQUE,
    url                 text NOT NULL,
    kind                text NOT NULL DEFAULT 'lmstudio'
                        CHECK (kind IN ('lmstudio', 'llamacpp', 'llamacpp-router', 'ollama', 'openai')),
    enabled             boolean NOT NULL DEFAULT true,  -- from config
    draining            boolean NOT NULL DEFAULT false, -- operator: finish in-flight work, take no more
    memory_bytes        bigint,                         -- budget (RAM) for the sizing formula
    system_reserve_bytes bigint NOT NULL DEFAULT 8000000000,
    safety_fraction     double precision NOT NULL DEFAULT 0.10,
    per_request_bytes   bigint NOT NULL DEFAULT 3000000000,
    hard_cap            integer NOT NULL DEFAULT 12,
    default_parallel    integer NOT NULL DEFAULT 1,     -- when the server does not report parallel
    token_env           text,                           -- name of the env var holding its API token
    health              text NOT NULL DEFAULT 'unknown' CHECK (health IN ('unknown', 'healthy', 'down')),
    failure_count       integer NOT NULL DEFAULT 0,     -- consecutive server faults, all workers
    backoff_level       integer NOT NULL DEFAULT 0,
    backoff_until       timestamptz,
    last_ok_at          timestamptz,
    last_error          text,
    refreshed_at        timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE aibot.model_instances (
    server_id           integer NOT NULL REFERENCES aibot.servers (id) ON DELETE CASCADE,
    model               text NOT NULL,
    state               text NOT NULL DEFAULT 'loaded' CHECK (state IN ('loading', 'loaded', 'unloading')),
    size_bytes          bigint NOT NULL DEFAULT 0,
    parallel            integer NOT NULL DEFAULT 1 CHECK (parallel >= 1),
    context_length      integer,
    loaded_at           timestamptz NOT NULL DEFAULT now(),
    last_used_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server_id, model)
);

-- A slot is the right to have one request in flight on (server, model). The rebalancer keeps the
-- number of rows per pair equal to what the sizing formula allows; a claim takes a free row with
-- SKIP LOCKED in the same transaction as the job, so in-flight can never exceed the rows.
CREATE TABLE aibot.slots (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server_id           integer NOT NULL REFERENCES aibot.servers (id) ON DELETE CASCADE,
    model               text NOT NULL,
    job_id              bigint,                        -- holder; NULL = free
    claim_token         uuid,                          -- the holder's fencing token
    taken_at            timestamptz,
    retired             boolean NOT NULL DEFAULT false -- to be deleted when released (capacity shrank)
);
CREATE INDEX slots_free ON aibot.slots (model, server_id) WHERE job_id IS NULL AND NOT retired;
CREATE UNIQUE INDEX slots_holder ON aibot.slots (job_id) WHERE job_id IS NOT NULL;

CREATE TABLE aibot.model_loads (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server_id           integer NOT NULL REFERENCES aibot.servers (id) ON DELETE CASCADE,
    model               text NOT NULL,
    action              text NOT NULL CHECK (action IN ('load', 'unload')),
    reason              text,
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    ok                  boolean,
    error               text,
    worker_id           text
);

CREATE TABLE aibot.workers (
    worker_id           text PRIMARY KEY,              -- host:pid:uuid8
    host                text NOT NULL,
    pid                 integer NOT NULL,
    role                text NOT NULL DEFAULT 'worker', -- worker | bot | scheduler | serve
    started_at          timestamptz NOT NULL DEFAULT now(),
    heartbeat_at        timestamptz NOT NULL DEFAULT now(),
    info                jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE aibot.cursors (
    source              text PRIMARY KEY,
    position            text NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE aibot.rate_events (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_id           text NOT NULL,
    at                  timestamptz NOT NULL DEFAULT now(),
    job_id              bigint
);
CREATE INDEX rate_events_entity_at ON aibot.rate_events (entity_id, at);

CREATE TABLE aibot.inbox (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message             jsonb NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE aibot.replies (
    reply_id            text PRIMARY KEY,              -- derived from the job, so a repeat is a no-op
    job_id              bigint NOT NULL,
    reply_to            text NOT NULL,
    entity_id           text NOT NULL,
    message             jsonb NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE aibot.scheduler_ticks (
    job_name            text NOT NULL,
    tick_at             timestamptz NOT NULL,
    runner              text NOT NULL,
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    PRIMARY KEY (job_name, tick_at)
);
