"""What one worker process does: the claim runtime (claim -> generate -> deliver -> complete, and
every failure branch) and the registry of live worker processes.

Driven by the Dramatiq actor in `aibot.actors`, and in-process by tests and benchmarks, so nothing
here builds a broker or declares an actor.
"""
