"""The entity configuration (`config-aientities.json` or a directory of per-entity files).

See docs/configuration.md for the schema and the decisions behind it.
"""

from __future__ import annotations

from aibot.config.color import parse_color
from aibot.config.escapes import unescape
from aibot.config.issues import ConfigError, Issue
from aibot.config.loader import LoadResult, check_config, load_config
from aibot.config.modelid import UnresolvableModel, resolve_model_id
from aibot.config.models import (
    GB,
    BotConfig,
    BotSettings,
    ClusterSettings,
    Entity,
    GlobalSettings,
    Quantization,
    QueueSettings,
    RateLimits,
    ServerConfig,
)
from aibot.config.store import ConfigStore

__all__ = [
    "GB", "BotConfig", "BotSettings", "ClusterSettings", "ConfigError", "ConfigStore",
    "Entity", "GlobalSettings", "Issue", "LoadResult", "Quantization", "QueueSettings", "RateLimits",
    "ServerConfig", "UnresolvableModel", "check_config", "load_config", "parse_color", "resolve_model_id",
    "unescape",
]
