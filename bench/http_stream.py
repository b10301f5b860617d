"""The worker's HTTP path for one streamed generation, alone: client CPU and wall time per generation and
TCP connections opened, for this tree and (optionally) another checkout, interleaved in one run.

    python bench/http_stream.py [--baseline-tree /path/to/other/checkout] [--tokens 1,200] [--calls 2000]
                                [--rounds 3]

Why a separate benchmark: bench/overhead.py measures the whole dispatch path on a shared 2-core box,
where the HTTP client's share (a third of the CPU per job) drowns in the noise. Here one client thread
calls `Backend.chat_stream` (the worker's call, kind `openai`) against a loopback responder
(bench/baselines/loopback.py's protocol, in its own process) that streams `--tokens` content events,
a finish event and `data: [DONE]`, chunked, as llama.cpp and LM Studio do. Each (tree, tokens) pair
runs in a fresh subprocess that imports aibot from that tree; trees alternate within every round and
the result is the median over rounds, as a ratio to the baseline.

Counted per generation: client CPU (process_time of the client subprocess), wall time, and TCP
connections the responder accepted. Writes bench/results/http_stream.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402

SERVER = r'''
import asyncio, json, sys
sys.path.insert(0, sys.argv[3])
from bench.baselines.loopback import Responder, canned
tokens, port = int(sys.argv[1]), int(sys.argv[2])
replies = canned(["m"], "ok")
head = {"id": "chatcmpl-loopback", "object": "chat.completion.chunk", "created": 0, "model": "m"}
events = [{**head, "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
          for _ in range(tokens)]
events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
replies["stream"] = ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()
connections = [0]
class Counting(Responder):
    def connection_made(self, transport):
        connections[0] += 1
        super().connection_made(transport)
    def data_received(self, data):
        if data.startswith(b"GET /_connections"):
            body = json.dumps({"connections": connections[0]}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            self.transport.close()
            return
        super().data_received(data)
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Counting(replies), "127.0.0.1", port)
    print("READY", srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''

CLIENT = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import aibot
assert aibot.__file__.startswith(sys.argv[1]), (aibot.__file__, sys.argv[1])
from aibot.backends import make_backend
from aibot.backends.base import ChatRequest
backend = make_backend("openai", sys.argv[2])
req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], params={"max_tokens": 16})
calls = int(sys.argv[3])
for _ in range(20):
    "".join(backend.chat_stream(req))
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(calls):
    "".join(backend.chat_stream(req))
print(json.dumps({"cpu_ms": (time.process_time() - c0) * 1000 / calls,
                  "wall_ms": (time.perf_counter() - w0) * 1000 / calls, "calls": calls + 20}))
'''


def connections(port: int) -> int:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/_connections", timeout=5).json()["connections"]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--baseline-tree", type=Path, help="another checkout of the repository to compare against")
    p.add_argument("--tokens", default="1,200", help="content events per stream (comma-separated)")
    p.add_argument("--calls", type=int, default=1000, help="generations per measurement (scaled down for long streams)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    tokens = common.positive_ints(p, "--tokens", args.tokens)
    if args.quick:
        args.calls, args.rounds = min(args.calls, 200), 1
    trees = {"this": common.REPO}
    if args.baseline_tree:
        base = args.baseline_tree.resolve()
        if not (base / "aibot" / "backends" / "http.py").exists():
            p.error(f"--baseline-tree {base} is not a checkout of this repository (no aibot/backends/http.py)")
        trees = {"baseline": base, **trees}
    results: dict[str, dict[int, list[dict]]] = {name: {t: [] for t in tokens} for name in trees}
    for t in tokens:
        srv = subprocess.Popen([sys.executable, "-c", SERVER, str(t), "0", str(common.REPO)],
                               stdout=subprocess.PIPE, text=True)
        try:
            line = srv.stdout.readline().split()
            if not line or line[0] != "READY":
                raise RuntimeError("the loopback responder did not start")
            port = int(line[1])
            calls = max(50, args.calls if t < 50 else args.calls // 5)
            for r in range(args.rounds):
                for name, tree in trees.items():
                    before = connections(port)
                    out = subprocess.run([sys.executable, "-c", CLIENT, str(tree), f"http://127.0.0.1:{port}",
                                          str(calls)], capture_output=True, text=True, check=True,
                                         env={**os.environ, "PYTHONPATH": str(tree)})
                    m = json.loads(out.stdout.strip().splitlines()[-1])
                    m["connections_per_call"] = round((connections(port) - before - 1) / m["calls"], 3)
                    results[name][t].append(m)
                    log(f"tokens {t} round {r + 1} {name}: cpu {m['cpu_ms']:.3f} ms, wall {m['wall_ms']:.3f} ms, "
                        f"{m['connections_per_call']} connections per generation")
        finally:
            srv.terminate()
            srv.wait(10)
    rows, summary = [], {}
    for t in tokens:
        for name in trees:
            ms = results[name][t]
            s = {"cpu_ms": round(statistics.median(x["cpu_ms"] for x in ms), 3),
                 "wall_ms": round(statistics.median(x["wall_ms"] for x in ms), 3),
                 "connections_per_call": statistics.median(x["connections_per_call"] for x in ms)}
            if "baseline" in trees and name == "this":
                b = summary[f"baseline/{t}"]
                s["cpu_ratio"] = round(s["cpu_ms"] / b["cpu_ms"], 3)
                s["wall_ratio"] = round(s["wall_ms"] / b["wall_ms"], 3)
            summary[f"{name}/{t}"] = s
            rows.append({"tree": name, "tokens": t, **s})
    columns = list(dict.fromkeys(k for r in rows for k in r))   # the ratio columns come with "this" only
    print(common.table([{c: r.get(c, "") for c in columns} for r in rows], columns,
                       title="One streamed generation through Backend.chat_stream"))
    common.write_json(args.output_dir, "http_stream", {
        "parameters": {"tokens": tokens, "calls": args.calls, "rounds": args.rounds,
                       "trees": {k: {"path": str(v), "commit": subprocess.run(
                           ["git", "-C", str(v), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip()} for k, v in trees.items()}},
        "summary": summary, "runs": {n: {str(t): v for t, v in d.items()} for n, d in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
