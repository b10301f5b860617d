"""Helpers for bench/overhead.py and bench/real_inference.py: scratch databases, progress, results and
plots (harness), a zero-latency OpenAI-compatible responder (loopback), and the competitor no-op
workers the overhead benchmark runs on the same Postgres (dramatiq_noop, procrastinate_noop,
pgqueuer_noop)."""
