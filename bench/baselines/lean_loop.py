"""What-if prototype (not product code) of the changes docs/benchmarks-overhead.md proposes, measured
by bench/overhead.py as the system `whatif-lean`:

- one autocommit connection per thread, no pool check before each use (the product's pool runs an
  empty query before every checkout: 4 extra round trips per job);
- no BEGIN/COMMIT around single statements (8 round trips per job in the product);
- "store reply + deliver to the postgres sink + complete" as one fenced statement (3 transactions and
  3 WAL flushes in the product become 1);
- everything else as the product does it: the product's slot-aware `claim_jobs()`, the entity config,
  aibot's prompt builder, its OpenAI-compatible HTTP backend, post-processing and reply message.

    python -m bench.baselines.lean_loop --threads 8      (AIBOT_DATABASE_URL, AIBOT_CONFIG set)

Each thread claims, generates and finishes jobs until SIGTERM; an empty claim backs off for 5 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from datetime import datetime, timezone

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from aibot.backends import make_backend
from aibot.config import load_config
from aibot.delivery import sinks
from aibot.generation import postprocess, prompt
from bench.baselines.harness import QUERIES


def worker(stop: threading.Event, url: str, config, backend, name: str, counts: list, i: int) -> None:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET search_path = aibot, public")
        while not stop.is_set():
            claim = conn.execute(QUERIES["bench_whatif_claim"], {"worker_id": name, "lease_seconds": 600.0}).fetchone()
            if claim is None:
                stop.wait(0.005)
                continue
            ent = config.entity(claim["entity_id"])
            payload = claim["payload"]
            req = prompt.build_request(ent, text=payload.get("text", ""), sender=payload.get("username", ""),
                                       context_lines=payload.get("context", []), model=claim["model"],
                                       global_settings=config.global_settings, token_budget=ent.context_token_budget)
            result = backend.chat(req)
            text = postprocess.clean_reply(result.text, ent, config.global_settings)
            reply = {"text": text, "username": ent.username, "color": ent.color, "entity": ent.id,
                     "model": claim["model"], "server": "loopback",
                     "generated_at": datetime.now(timezone.utc).isoformat()}
            message = sinks.reply_message(claim["job_id"], payload, reply)
            conn.execute(QUERIES["bench_whatif_finish"], {
                "reply": Jsonb(reply), "job_id": claim["job_id"], "token": claim["claim_token"],
                "reply_id": message["id"], "reply_to": str(payload.get("message_id") or ""),
                "entity_id": payload.get("entity_id") or "-", "message": Jsonb(message)})
            counts[i] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--backend-url", required=True)
    args = p.parse_args(argv)
    url = os.environ["AIBOT_DATABASE_URL"]
    config = load_config(os.environ["AIBOT_CONFIG"])
    backend = make_backend("openai", args.backend_url, default_parallel=args.threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    counts = [0] * args.threads
    threads = [threading.Thread(target=worker, args=(stop, url, config, backend, f"lean:{os.getpid()}:{i}", counts, i))
               for i in range(args.threads)]
    for t in threads:
        t.start()
    print("lean loop ready", flush=True)
    for t in threads:
        t.join()
    print(f"lean loop stopped after {sum(counts)} jobs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
