"""A zero-latency OpenAI-compatible server: the ceiling backend for the overhead benchmark.

Why not the simulator with speed 0: the simulator models slots, batching and memory in Python threads
(one per connection, a lock per request), so at thousands of requests per second on 2 cores it would
measure itself. This answers every chat with the same canned body from one asyncio loop (uvloop when
installed) and parses only what HTTP/1.1 keep-alive needs, so the dispatcher under test is the
bottleneck. It serves `GET /v1/models` (the models named on the command line; `kind: openai` lists
them as loaded) and `POST /v1/chat/completions`, as one JSON body or, when the request asks for
`"stream": true` (aibot's worker streams by default), as a server-sent-event stream of one content
chunk, a final chunk with `finish_reason` and usage, and `data: [DONE]`; everything else is 404.

    python -m bench.baselines.loopback --port 0 --model bench-model
prints `READY http://127.0.0.1:PORT` and serves until SIGTERM; `GET /_stats` returns the request count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: keep-alive\r\n\r\n").encode() + body


STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')


class Responder(asyncio.Protocol):
    served = 0

    def __init__(self, replies: dict[str, bytes]) -> None:
        self.replies = replies
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4:head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length:]
            method, path = head.split(" ", 2)[:2]
            key = f"{method} {path.split('?', 1)[0]}"
            if key == "POST /v1/chat/completions":
                Responder.served += 1
                if STREAM_FLAG.search(body):
                    self.transport.write(_response("200 OK", self.replies["stream"], "text/event-stream"))
                    continue
            elif key == "GET /_stats":
                self.transport.write(_response("200 OK", json.dumps({"served": Responder.served}).encode()))
                continue
            body = self.replies.get(key)
            self.transport.write(_response("200 OK", body) if body is not None
                                 else _response("404 Not Found", b'{"error": {"message": "not found"}}'))


def canned(models: list[str], text: str) -> dict[str, bytes]:
    chat = {"id": "chatcmpl-loopback", "object": "chat.completion", "created": 0, "model": models[0],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
    listing = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "loopback"} for m in models]}
    chunk = {"id": "chatcmpl-loopback", "object": "chat.completion.chunk", "created": 0, "model": models[0]}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": chat["usage"]},
    ]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return {"POST /v1/chat/completions": json.dumps(chat).encode(), "GET /v1/models": json.dumps(listing).encode(),
            "stream": stream.encode()}


async def serve(host: str, port: int, models: list[str], text: str) -> None:
    loop = asyncio.get_running_loop()
    replies = canned(models, text)
    server = await loop.create_server(lambda: Responder(replies), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", action="append", required=True, help="model id to list (repeatable)")
    p.add_argument("--text", default="ok, noted.", help="the canned reply")
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.model, args.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
