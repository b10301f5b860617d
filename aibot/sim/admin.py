"""`/_sim/*`: observe and steer a simulator from another process (the demo, `aibot sim` in a subprocess).

| endpoint | body | effect |
|---|---|---|
| `GET /_sim/stats` | | `SimServer.stats()` |
| `POST /_sim/reset` | `{"unload": bool}` optional | clears counters (and unloads everything) |
| `GET /_sim/faults` | | the current fault config |
| `POST /_sim/faults` | FaultConfig fields, `"clear": true`, `"next": [kinds]`, `"outage_seconds": s` | changes only the named fields |
| `POST /_sim/outage` | `{"seconds": s, "mode": "refuse"|"503"}` | starts an outage |
| `POST /_sim/outage/end` | | ends a 503-mode outage |
| `POST /_sim/load` | `{"model": key, "instant": true}` | loads (instantly by default) |
| `POST /_sim/unload` | `{"model": key}` or `{"all": true}` | unloads |
| `GET /_sim/log` | | the last 500 API requests |
| `GET /_sim/config` | | the server's configuration (never the token) |
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from aibot.sim.engine import EngineError
from aibot.sim.faults import FaultConfigError
from aibot.sim.http import BadBody, Reply, Request, json_reply

if TYPE_CHECKING:
    from aibot.sim.server import SimServer


def _error(message: str, status: int = 400) -> Reply:
    return json_reply({"error": message}, status)


def _config_view(sim: SimServer) -> dict[str, Any]:
    cfg = dataclasses.asdict(sim.config)
    cfg.pop("api_token", None)
    cfg["api_token_set"] = bool(sim.config.api_token)
    cfg["url"] = sim.url
    return cfg


def handle_admin(sim: SimServer, req: Request) -> Reply:
    try:
        body = req.json_object() if req.method == "POST" else {}
    except BadBody as exc:
        return _error(str(exc))
    route = (req.method, req.path.rstrip("/"))
    try:
        if route == ("GET", "/_sim/stats"):
            return json_reply(sim.stats())
        if route == ("GET", "/_sim/config"):
            return json_reply(_config_view(sim))
        if route == ("GET", "/_sim/log"):
            return json_reply({"requests": sim.request_log()})
        if route == ("POST", "/_sim/reset"):
            if body.get("unload"):
                sim.engine.unload_all()
            sim.reset_stats()
            return json_reply(sim.stats())
        if route == ("GET", "/_sim/faults"):
            return json_reply(sim.faults.config.to_dict())
        if route == ("POST", "/_sim/faults"):
            return _faults(sim, dict(body))
        if route == ("POST", "/_sim/outage"):
            return _outage(sim, body.get("seconds"), body.get("mode"))
        if route == ("POST", "/_sim/outage/end"):
            sim.end_outage()
            return json_reply({"outage": False})
        if route == ("POST", "/_sim/load"):
            model = body.get("model")
            if not isinstance(model, str):
                return _error("'model' is required (a catalogue key)")
            instance = sim.load(model, instant=bool(body.get("instant", True)))
            return json_reply({"instance_id": instance, "status": "loaded"})
        if route == ("POST", "/_sim/unload"):
            if body.get("all"):
                return json_reply({"unloaded": sim.engine.unload_all()})
            model = body.get("model")
            if not isinstance(model, str):
                return _error("'model' (a catalogue key) or 'all': true is required")
            return json_reply({"unloaded": sim.unload(model)})
    except (EngineError, FaultConfigError, ValueError) as exc:
        return _error(str(exc))
    return _error(f"unknown admin endpoint {req.method} {req.path}", 404)


def _faults(sim: SimServer, body: dict[str, Any]) -> Reply:
    outage = body.pop("outage_seconds", None)
    if body.pop("clear", False):
        sim.clear_faults()
    nxt = body.pop("next", None)
    if nxt is not None:
        if not isinstance(nxt, list):
            return _error(f"'next': {nxt!r} must be a list of fault kinds")
        body["script"] = list(sim.faults.config.script) + nxt
    if body:
        sim.set_faults(**body)
    reply = json_reply(sim.faults.config.to_dict())
    if outage is not None:
        outage_reply = _outage(sim, outage, body.get("outage_mode"))
        if outage_reply.status != 200:
            return outage_reply
        reply.close, reply.after = outage_reply.close, outage_reply.after
    return reply


def _outage(sim: SimServer, seconds: Any, mode: Any) -> Reply:
    if seconds is not None and (not isinstance(seconds, (int, float)) or seconds <= 0):
        return _error(f"'seconds': {seconds!r} must be a positive number")
    mode = mode or sim.faults.config.outage_mode
    if mode not in ("refuse", "503"):
        return _error(f"'mode': {mode!r} must be 'refuse' or '503'")
    if mode == "refuse" and seconds is None:
        return _error("a 'refuse' outage needs 'seconds': nothing could end it over HTTP")
    # Start it after this reply is on the wire, and close this connection: the socket is going away.
    return Reply(200, b'{"outage": true}', close=True,
                 after=lambda: sim.begin_outage(seconds=seconds, mode=mode))
