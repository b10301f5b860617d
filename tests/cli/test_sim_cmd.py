"""`aibot sim` as a separate process: the READY protocol, serving, admin over HTTP, clean SIGTERM/SIGINT exit,
and the cluster helpers in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from aibot.sim import GB, start_cluster
from aibot.sim.cluster import SimCluster, seed_spec


def _spawn(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict[str, str]]:
    """Starts `aibot sim` and reads its stdout up to READY; returns the process and {name: url}."""
    proc = subprocess.Popen([sys.executable, "-m", "aibot", "sim", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    urls: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:             # blocks per line; EOF ends the loop if the process dies
        line = line.strip()
        if line == "READY":
            return proc, urls
        name, url = line.split()
        urls[name] = url
    proc.wait(10)
    raise AssertionError(f"aibot sim exited {proc.returncode} before READY: {proc.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_subprocess_prints_urls_ready_and_exits_cleanly(sig):
    proc, urls = _spawn("--servers", "2", "--speed", "0.001", "--models", "3", "--model-gb", "1",
                        "--parallel", "1,4", "--preload", "sim/model-1@f16")
    try:
        assert list(urls) == ["mac-studio-1", "mac-studio-2"]
        for name, url in urls.items():
            models = httpx.get(f"{url}/api/v1/models", timeout=5).json()["models"]
            # LM Studio lists a model by key, the configured `<base>@<quant>` being its selected variant.
            assert [m["key"] for m in models] == ["sim/model-1", "sim/model-2", "sim/model-3"]
            assert models[0]["selected_variant"] == "sim/model-1@f16"
            loaded = models[0]["loaded_instances"]
            assert loaded and loaded[0]["config"]["parallel"] == (1 if name == "mac-studio-1" else 4)
            r = httpx.post(f"{url}/v1/chat/completions", timeout=5,
                           json={"model": "sim/model-1@f16", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            assert httpx.get(f"{url}/_sim/stats").json()["models"]["sim/model-1@f16"]["served"] == 1
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert out.strip().endswith("STOPPED")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{urls['mac-studio-1']}/v1/models", timeout=2)


def test_subprocess_from_spec_file_with_token_from_env(tmp_path):
    spec = tmp_path / "cluster.json"
    spec.write_text(json.dumps({
        "defaults": {"speed": 0.001, "models": {"count": 2, "size_gb": 1}},
        "servers": [{"name": "lms", "api": "lmstudio", "memory_gb": 8},
                    {"name": "oll", "api": "ollama"}, {"name": "cpp", "api": "llamacpp"}],
    }))
    proc, urls = _spawn("--spec", str(spec))
    try:
        assert list(urls) == ["lms", "oll", "cpp"]
        assert httpx.get(f"{urls['oll']}/api/version").status_code == 200
        assert httpx.get(f"{urls['cpp']}/health").json() == {"status": "ok"}
        assert httpx.get(f"{urls['lms']}/_sim/config").json()["memory_bytes"] == 8 * GB
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert proc.returncode == 0

    tok, urls2 = _spawn("--servers", "1", "--speed", "0.001", "--api-token-env", "SIM_TEST_TOKEN",
                        env={"SIM_TEST_TOKEN": "tok-123"})
    try:
        url = urls2["mac-studio-1"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer tok-123"}).status_code == 200
    finally:
        tok.terminate()
        _, err = tok.communicate(timeout=15)
    assert "tok-123" not in err


def test_bad_flags_and_specs_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"servers": [{"name": "a", "memory_gb": -1}]}))
    for args, needle in ([["--spec", str(bad)], "servers[0].memory_gb"],
                         [["--parallel", "one"], "--parallel"],
                         [["--api-token-env", "SIM_SURELY_UNSET_VAR"], "SIM_SURELY_UNSET_VAR"],
                         [["--preload", "sim/nope"], "sim/nope"]):
        r = subprocess.run([sys.executable, "-m", "aibot", "sim", *args], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
        assert "READY" not in r.stdout


def test_seed_cluster_in_process():
    with start_cluster(speed=0.001) as cluster:
        assert isinstance(cluster, SimCluster)
        assert list(cluster.urls) == ["mac-studio-1", "mac-studio-2"]
        one, four = cluster["mac-studio-1"], cluster["mac-studio-2"]
        for server in (one, four):
            r = httpx.post(f"{server.url}/api/v1/models/load", json={"model": "sim/model-1"}, timeout=10)
            assert r.status_code == 200
        p = {s.name: httpx.get(f"{s.url}/api/v1/models").json()["models"][0]["loaded_instances"][0]["config"]["parallel"]
             for s in cluster}
        assert p == {"mac-studio-1": 1, "mac-studio-2": 4}
        assert cluster.stats()["mac-studio-2"]["memory"]["budget_bytes"] == 128 * GB
        with pytest.raises(KeyError, match="mac-studio-9"):
            cluster["mac-studio-9"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{one.url}/v1/models", timeout=2)


def test_seed_cluster_memory_allows_eight_models_not_nine():
    """Capacity planning: 128 GB holds eight 15 GB models (120 GB); the ninth is refused."""
    spec = seed_spec(speed=0.0001, models=9, servers=1)
    with SimCluster(spec) as cluster:
        url = cluster["mac-studio-1"].url
        codes = [httpx.post(f"{url}/api/v1/models/load", json={"model": f"sim/model-{i}"}, timeout=10).status_code
                 for i in range(1, 10)]
        assert codes == [200] * 8 + [500]
