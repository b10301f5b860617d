"""What the cluster takes from the entity configuration: its servers, the model names its entities
resolve to, and the configuration's fingerprint (a permanent refusal is retried when it changes).

Read through a hot-reloading `ConfigStore` per path, so the scheduler, the loader and `aibot plan`
see an edit without a restart. Owns nothing in the database; it is the bottom of the cluster chain.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_stores: dict[str, Any] = {}


@dataclass(frozen=True)
class Configured:
    """What the cluster takes from the entity configuration: its servers, the model names its
    entities resolve to (refresh looks each up on every server) and the configuration's fingerprint."""

    servers: list[Any]
    models: frozenset[str]
    fingerprint: str | None
    config: Any = None


def configured(config_path: str | None = None) -> Configured | None:
    """The (hot-reloaded) entity configuration, or None when there is no usable one.

    None means "do not sync": a missing or broken config must not disable every server.
    """
    try:
        from aibot.config import ConfigStore
        from aibot.config.modelid import configured_model_ids
        from aibot.settings import get_settings

        path = config_path or get_settings().config_path
        if not os.path.exists(path):
            logger.debug("no config at %s; servers are not synced", path)
            return None
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = ConfigStore(path)
        config = store.get()
        return Configured(list(config.servers), frozenset(configured_model_ids(config)), store.fingerprint, config)
    except Exception as exc:  # noqa: BLE001 - a bad config is logged by the store and must not stop refreshes
        logger.error("cannot read servers from the config: %s", exc)
        return None
