"""One simulator process serves hundreds of concurrent streamed requests (issue 15: the simulator on
uvicorn, so a benchmark's concurrency is not limited by a thread per connection)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from aibot.sim import SimServer
from aibot.sim.catalog import GB, ModelSpec
from aibot.sim.config import SimConfig

pytestmark = pytest.mark.timeout(180)

N = 300


async def stream_one(client: httpx.AsyncClient, i: int) -> tuple[int, bool]:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": f"hello {i}"}]}
    pieces, done = 0, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                pieces += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
    return pieces, done


def test_hundreds_of_concurrent_streams_in_one_process():
    # Each reply takes ~1 s of paced generation, so N of them overlap only if they are served at once.
    config = SimConfig(api="lmstudio", models=[ModelSpec("m", 1 * GB, parallel=N)], preloaded=["m"], speed=1.0,
                       ttft_seconds=0.0, per_token_seconds=0.05, reply_tokens=20, batch_alpha=0.0)
    with SimServer(config) as sim:
        async def run() -> list[tuple[int, bool]]:
            limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
            async with httpx.AsyncClient(base_url=sim.url, limits=limits, timeout=60) as client:
                return await asyncio.gather(*(stream_one(client, i) for i in range(N)))

        results = asyncio.run(run())
        stats = sim.model_stats("m")
    assert all(done and pieces > 0 for pieces, done in results), [r for r in results if not r[1]][:3]
    assert stats["in_flight"] == 0
    assert stats["peak_in_flight"] >= N * 0.9, stats["peak_in_flight"]
