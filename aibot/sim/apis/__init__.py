"""One module per API dialect; `make_flavour` picks the one a `SimConfig.api` names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aibot.sim.apis.common import Flavour

if TYPE_CHECKING:
    from aibot.sim.server import SimServer


def make_flavour(sim: SimServer) -> Flavour:
    api = sim.config.api
    if api == "lmstudio":
        from aibot.sim.apis.lmstudio import LMStudio
        return LMStudio(sim)
    if api == "openai":
        from aibot.sim.apis.openai import OpenAI
        return OpenAI(sim)
    if api == "llamacpp":
        from aibot.sim.apis.llamacpp import LlamaCpp
        return LlamaCpp(sim)
    if api == "llamacpp-router":
        from aibot.sim.apis.llamacpp import LlamaCppRouter
        return LlamaCppRouter(sim)
    if api == "ollama":
        from aibot.sim.apis.ollama import Ollama
        return Ollama(sim)
    raise ValueError(f"SimConfig.api: unknown API flavour {api!r}")
