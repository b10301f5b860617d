"""Builds the Dramatiq broker from the environment, so a worker host needs only the database URL.

`AIBOT_BROKER_URL` may select Redis (`redis://`) or RabbitMQ (`amqp://`); by default the broker is
dramatiq-postgres on the aibot database itself, which lets the bot enqueue doorbells in the same
transaction as the jobs they announce.
"""

from __future__ import annotations

import os

import dramatiq


def broker_url() -> str:
    url = os.environ.get("AIBOT_BROKER_URL") or os.environ.get("AIBOT_DATABASE_URL")
    if not url:
        raise RuntimeError("set AIBOT_DATABASE_URL (and optionally AIBOT_BROKER_URL) before starting workers")
    return url


def broker_kind(url: str | None = None) -> str:
    url = url or broker_url()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "redis"
    if url.startswith(("amqp://", "amqps://")):
        return "rabbitmq"
    return "postgres"


def make_broker(url: str | None = None) -> dramatiq.Broker:
    url = url or broker_url()
    kind = broker_kind(url)
    if kind == "redis":
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)
    if kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url)
    from dramatiq_postgres import PostgresBroker

    # Results are not used: the jobs table holds every outcome.
    return PostgresBroker(url=url, results=False, poll_interval=1.0)
