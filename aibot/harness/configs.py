"""Entity configurations in the original bot's format, written for a harness deployment.

`write_config` produces the file `aibot bot` and the workers read (`AIBOT_CONFIG`), and `entity` one
entity of it, so tests, the demo and the benchmarks describe their personas the way operators do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_config(path: str | os.PathLike, *, servers: list[dict], entities: list[dict], **top) -> str:
    """Writes a config in the original bot's format (plus aibot's server fields)."""
    doc = {
        "version": "aibot-generated",
        "botSettings": {"pollingInterval": 200},
        "queueSettings": {"defaultPriority": 50, "maxRetries": 3},
        "clusterSettings": {"keepModelsLoaded": True},
        "globalSettings": {"globalStopSequences": ["\\nHuman:"]},
        "lmStudioServers": servers,
        "entities": entities,
        **top,
    }
    Path(path).write_text(json.dumps(doc, indent=2))
    return str(path)


def entity(eid: str, model: str, *, priority: int = 50, rate_limits: dict | None = None, **extra) -> dict:
    """An entity in the original format, answering as `eid` with `model`."""
    doc = {
        "id": eid, "enabled": True, "username": eid[:16], "color": "080175220",
        "baseModel": model, "quantizations": {"f16": {"modelPath": model, "enabled": True}},
        "defaultQuantization": "f16", "systemRole": "system",
        "systemPrompt": f"You are {eid}.", "userPrompt": "Reply briefly.",
        "nom": 20, "defaultPriority": priority, "temperature": 0.7, "maxTokens": 40,
        "filterOut": [], "trimAfter": ["Human:"], "trimWhitespace": True,
    }
    if rate_limits is not None:
        doc["rateLimits"] = rate_limits
    doc.update(extra)
    return doc
