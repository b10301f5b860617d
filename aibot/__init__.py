"""aibot: answers chat messages as AI personas on a cluster of local LLM servers.

The durable state (jobs, servers, loaded models, slots, cursors) lives in Postgres so that any
number of bot, scheduler and worker processes on any number of hosts agree on it.
"""

__version__ = "0.1.0"
