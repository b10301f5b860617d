"""What one generation costs the worker's client on a REAL llama.cpp server, streamed and not (issue 13).

    python bench/stream_cost.py [--tokens 16,64] [--calls 20] [--rounds 2]

Why: bench/http_stream.py measures the streamed path against a loopback responder that writes a whole
stream at once, a few microseconds per event. A real server writes each token as it is generated, so
every event is a read of its own through httpcore, h11 and httpx's byte stream before aibot's SSE parser
sees it. Here one client thread calls the worker's two calls, `Backend.chat_stream` (the default,
AIBOT_STREAM=1) and `Backend.chat` (AIBOT_STREAM=0), alternately on one of the two llama.cpp servers of
bench/real_inference.py (xllamacpp, Gemma 3 270M, one inference thread), with `max_tokens` set to each
`--tokens` value and a prompt that runs to it.

Reported per call: the client's CPU (process_time of this process, which runs nothing else meanwhile),
its wall time, and the streamed call's CPU per generated token beyond the plain call's. On this 2-core
machine the inference threads use both cores, so the client's CPU is taken from them. A third call,
`reference`, is not aibot's: the same streamed request read with the standard library's http.client
(a new connection per call, `read1` per chunk, the same line split and JSON parse), as a measure of
what a lighter HTTP path for streams could save.
Writes bench/results/stream_cost.json.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import tempfile
import time

import common  # bench/common.py; also puts the repository on sys.path

from aibot.backends import Timeouts, make_backend  # noqa: E402
from aibot.backends.base import ChatRequest  # noqa: E402

NAME = "stream_cost"
PROMPT = "Tell me a long story about the sea, with at least three paragraphs."


def reference_stream(url: str, body: dict) -> str:
    """The streamed request read with http.client: no pool, no error typing, only the parse."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        parts, buf = [], b""
        while chunk := resp.read1(65536):
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"data: ") and line[6:] != b"[DONE]":
                    for choice in json.loads(line[6:]).get("choices", ()):
                        if text := (choice.get("delta") or {}).get("content"):
                            parts.append(text)
        return "".join(parts)
    finally:
        conn.close()


def measure(backend, url: str, model: str, tokens: int, calls: int) -> dict:
    req = ChatRequest(model=model, messages=[{"role": "user", "content": PROMPT}],
                      params={"max_tokens": tokens, "temperature": 0})
    body = {"model": model, "messages": req.messages, "max_tokens": tokens, "temperature": 0}
    out = {}
    for name, call in (("chat", lambda: backend.chat(req).text), ("stream", lambda: "".join(backend.chat_stream(req))),
                       ("reference", lambda: reference_stream(url, body))):
        call()                                   # warm: connection, plans, the server's cache
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            call()
        out[name] = {"cpu_ms": (time.process_time() - c0) * 1000 / calls,
                     "wall_ms": (time.perf_counter() - w0) * 1000 / calls}
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--tokens", default="16,64", help="max_tokens per generation (comma-separated)")
    p.add_argument("--calls", type=int, default=20, help="generations per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    tokens = common.positive_ints(p, "--tokens", args.tokens)
    if args.calls < 1 or args.rounds < 1:
        p.error("--calls and --rounds must be >= 1")
    if args.quick:
        args.calls, args.rounds = min(args.calls, 5), 1

    from tests import real_llm

    log_file = tempfile.TemporaryFile()
    proc, llm = real_llm.start(real_llm.model_file(), log_file)
    rows = []
    try:
        common.wait_until(lambda: all(real_llm.healthy(u) for u in llm.urls) or proc.poll() is not None, 180,
                          "the llama.cpp servers to report /health ok", 0.2)
        if proc.poll() is not None:
            raise RuntimeError("the llama.cpp servers exited")
        backend = make_backend("llamacpp", llm.urls[0], timeouts=Timeouts(total=600, read=600))
        try:
            for rnd in range(1, args.rounds + 1):
                for t in tokens:
                    m = measure(backend, llm.urls[0], llm.models[0], t, args.calls)
                    row = {"round": rnd, "max_tokens": t, "chat_cpu_ms": round(m["chat"]["cpu_ms"], 3),
                           "stream_cpu_ms": round(m["stream"]["cpu_ms"], 3),
                           "reference_stream_cpu_ms": round(m["reference"]["cpu_ms"], 3),
                           "stream_over_chat_cpu": round(m["stream"]["cpu_ms"] / m["chat"]["cpu_ms"], 2),
                           "extra_cpu_ms_per_token": round((m["stream"]["cpu_ms"] - m["chat"]["cpu_ms"]) / t, 4),
                           "chat_wall_ms": round(m["chat"]["wall_ms"], 1), "stream_wall_ms": round(m["stream"]["wall_ms"], 1)}
                    rows.append(row)
                    common.log(f"round {rnd}, {t} tokens: chat {row['chat_cpu_ms']} ms CPU, stream "
                               f"{row['stream_cpu_ms']} ms CPU ({row['extra_cpu_ms_per_token']} ms more per token), "
                               f"http.client reference {row['reference_stream_cpu_ms']} ms")
        finally:
            backend.close()
    finally:
        real_llm.stop(proc)
        log_file.close()
    print(common.table(rows, list(rows[0]), title="client CPU per generation on a real llama.cpp server"))
    summary = {t: {"stream_over_chat_cpu_median": statistics.median(r["stream_over_chat_cpu"] for r in rows if r["max_tokens"] == t),
                   "extra_cpu_ms_per_token_median": statistics.median(r["extra_cpu_ms_per_token"] for r in rows if r["max_tokens"] == t),
                   "stream_over_reference_cpu_median": statistics.median(
                       r["stream_cpu_ms"] / r["reference_stream_cpu_ms"] for r in rows if r["max_tokens"] == t)}
               for t in tokens}
    common.write_json(args.output_dir, NAME, {"parameters": {"tokens": tokens, "calls": args.calls, "rounds": args.rounds},
                                              "summary": summary, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
