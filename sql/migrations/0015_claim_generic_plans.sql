-- claim_jobs plans its statements once per session, not on every call (issue 13: dispatch overhead).
--
-- plpgsql caches each statement's plan, but one with parameters (here: the function's arguments and
-- variables) gets a custom plan, planned again on every call, for as long as the plan cache judges that
-- better than its generic plan, which for the candidate query (unnest, two laterals, a union) it always
-- did. Planning was most of the claim: 0.68 ms of Postgres time per call against 0.40 ms with generic
-- plans (bench/claim_functions.py: 3,000 sequential claims and completions on one session,
-- pg_stat_user_functions, medians of 3 rounds; docs/benchmarks-overhead.md). The generic plans are the
-- ones tests/queue/test_claim_plan.py checks for index scans, as it checks the custom ones.

ALTER FUNCTION aibot.claim_jobs(text, double precision, boolean, integer, integer)
    SET plan_cache_mode = force_generic_plan;
