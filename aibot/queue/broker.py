"""The Dramatiq broker doorbells travel on, built from the settings, so a worker host needs only the
database URL.

`AIBOT_BROKER_URL` may select Redis (`redis://`) or RabbitMQ (`amqp://`); by default the broker is
dramatiq-postgres on the aibot database itself, which lets the bot enqueue doorbells in the same
transaction as the jobs they announce (`aibot.queue.doorbell`). Lives in the queue package because
both the doorbells and the Dramatiq entry point (`aibot.actors`) need it, and the entry point
declares the actors on import.
"""

from __future__ import annotations

import threading

import dramatiq

_lock = threading.Lock()
_broker: dramatiq.Broker | None = None


def broker_url() -> str:
    """The settings' broker URL (AIBOT_BROKER_URL, by default AIBOT_DATABASE_URL)."""
    from aibot.settings import get_settings

    url = get_settings().broker_url
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


def process_broker() -> dramatiq.Broker:
    """This process's broker, built on first use and set as Dramatiq's global broker, so the entry
    point's actors and the doorbells of a bot process share one."""
    global _broker
    with _lock:
        if _broker is None:
            _broker = make_broker()
            dramatiq.set_broker(_broker)
        return _broker
