"""The job queue in Postgres: jobs and their claims, the retry/priority policy, rate limits enforced
at claim time, and the doorbells (Dramatiq messages) that wake the claim actor.

Owns the tables `jobs`, `rate_events` and the claim functions of `0002_queue.sql`, and the broker the
doorbells travel on. Knows nothing of servers beyond the slot a claim takes (`aibot.cluster` owns
them) and nothing of LLMs or chat.
"""
