"""Stage stamps for `bench/dispatch_latency.py --stages` (benchmark instrumentation, never the product).

The benchmark puts this directory first on the workers' PYTHONPATH and names a directory in
AIBOT_STAGE_TRACE; Python then imports this module at start-up in every aibot process, and it wraps
three methods of `aibot.worker.runtime.Runtime` as that module is first imported, writing one line
per event (`perf_counter thread event job_id`) to `<dir>/stages-<pid>.log`. perf_counter is
CLOCK_MONOTONIC on Linux, one clock for the benchmark and every worker process:

  invocation   a claim-actor invocation starts (Dramatiq handed a doorbell message to a thread)
  claimed      the invocation's own claim returned a job (not one taken along by a completion)
  request      the worker starts the job's HTTP generation request

Without AIBOT_STAGE_TRACE it does nothing.
"""

import importlib.abc
import importlib.util
import os
import sys
import threading
import time

_DIR = os.environ.get("AIBOT_STAGE_TRACE")


def _install() -> None:
    out = open(os.path.join(_DIR, f"stages-{os.getpid()}.log"), "a", buffering=1)
    lock = threading.Lock()

    def stamp(event: str, job: object = "-") -> None:
        line = f"{time.perf_counter():.6f} {threading.get_ident()} {event} {job}\n"
        with lock:
            out.write(line)

    def patch(runtime) -> None:
        cls = runtime.Runtime
        run_invocation, claim, generate = cls.run_invocation, cls._claim, cls._generate

        def run_invocation_stamped(self):
            stamp("invocation")
            return run_invocation(self)

        def claim_stamped(self, **kw):
            c = claim(self, **kw)
            if c is not None:
                stamp("claimed", c.job_id)
            return c

        def generate_stamped(self, backend, request, item):
            stamp("request", item.job_id)
            return generate(self, backend, request, item)

        cls.run_invocation, cls._claim, cls._generate = run_invocation_stamped, claim_stamped, generate_stamped

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "aibot.worker.runtime":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if _DIR:
    _install()
