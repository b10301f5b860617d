"""A plain OpenAI-compatible server (vLLM, a hosted API, LM Studio with only /v1 exposed): no load control.

Every model it serves is always loaded; a request for any other model gets OpenAI's `model_not_found` 404.
"""

from __future__ import annotations

from aibot.sim.apis.common import Flavour, openai_chat
from aibot.sim.http import Reply, Request, Route, json_reply


class OpenAI(Flavour):
    name = "openai"

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/models", self.models),
            Route("POST", "/v1/chat/completions", self.chat, chat=True),
        ]

    def models(self, req: Request) -> Reply:
        loaded = sorted({i.key for i in self.engine.instances() if i.state == "loaded"})
        return json_reply({"object": "list", "data": [
            {"id": k, "object": "model", "created": 1700000000, "owned_by": self.engine.catalog[k].publisher}
            for k in loaded]})

    def chat(self, req: Request) -> Reply:
        return openai_chat(self, req, jit=False)
