"""The cluster of LLM servers as Postgres records it: servers, resident models, slots, health.

A one-way chain; a module imports only modules listed before it (tests/test_architecture.py checks):

    sizing      pure: the seed's slot formula and memory arithmetic
    placement   pure: slot split, where to load, what to evict
    demand      pure: swaps under the starvation bound, replicas, idle unloads
    concurrency pure: a (server, model)'s slots at the knee of its measured tokens/s curve
    configured  what the cluster takes from the entity configuration (servers, model names)
    health      shared server and (server, model) health and backoff
    state       server rows and views, queued demand, the usable-server rule, can_load
    slots       rebalancing: slot rows = the sizing result
    loader      single-flight model loading and unloading, and loads for queued demand
    refresh     servers from config, and what each server holds (HTTP refresh)
    plan        the capacity plan `aibot plan` prints

Owns the tables `servers`, `model_instances`, `slots`, `model_loads`, `model_catalog` and
`model_health`; never touches jobs except to read queued demand.
"""

#: The chain above, bottom first: a module may import only the modules before it.
CHAIN = ("sizing", "placement", "demand", "concurrency", "configured", "health", "state", "slots", "loader", "refresh", "plan")
