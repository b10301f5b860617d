"""Runs every benchmark, one after the other, and prints what each found.

    python bench/run_all.py [--quick] [--only seed_scenarios,saturation] [--database-url URL]

One at a time on purpose: they share a small machine, and each compares aibot with its baseline
inside its own run, so none may disturb another. A benchmark that fails does not stop the others;
the exit status is 1 if any failed. Benchmarks 4 (bench/overhead.py) and 8 (bench/real_inference.py)
are run when present and skipped with a note when not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

BENCH = Path(__file__).resolve().parent
# (number, script name = results name, what it shows)
BENCHMARKS = [
    (1, "seed_scenarios", "seed scenarios: sequential vs aibot makespan"),
    (2, "saturation", "2,000 jobs over 24 slots: utilisation"),
    (3, "dispatch_latency", "enqueue → request at the server"),
    (4, "overhead", "aibot's own overhead (another engineer's)"),
    (5, "memory_safety", "peak memory vs budget"),
    (6, "load_storm", "loads for 50 requests to a cold model"),
    (7, "swap_thrash", "loads per 1,000 replies, p99 wait"),
    (8, "real_inference", "real llama.cpp inference (another engineer's)"),
    (9, "scaling", "claim latency and jobs/s vs queue depth and cluster size, plans checked"),
    (10, "workload", "trace: 32 personas, 2 × 128 GB, aibot vs Ollama/llama-swap/LM Studio/LiteLLM/sequential"),
    (11, "adaptive_real", "adaptive concurrency on a real llama.cpp router: aibot's cap vs the server's own curve"),
    (12, "stream_cost", "client CPU per generation on a real llama.cpp server, streamed vs not"),
]


def supports(script: Path, flag: str) -> bool:
    """Whether a script's --help mentions `flag` (benchmarks 4 and 8 are not ours to assume about)."""
    try:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return flag in out.stdout


def target_of(out_dir: Path, name: str) -> str:
    try:
        doc = json.loads((out_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return "-"
    target = doc.get("target")
    if isinstance(target, dict) and "met" in target:
        return common.verdict(target["met"])
    return "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("AIBOT_DATABASE_URL") or common.DEFAULT_DATABASE_URL)
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="each benchmark's fast pass (small counts)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--only", help="comma-separated names or numbers to run (default: all)")
    args = p.parse_args(argv)
    wanted = None
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        known = {n for _, n, _ in BENCHMARKS} | {str(i) for i, _, _ in BENCHMARKS}
        unknown = sorted(wanted - known)
        if unknown:
            p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")

    rows = []
    for number, name, what in BENCHMARKS:
        if wanted is not None and name not in wanted and str(number) not in wanted:
            continue
        script = BENCH / f"{name}.py"
        if not script.exists():
            common.log(f"=== {number}. {name}: skipped (bench/{name}.py is not there yet)")
            rows.append({"#": number, "benchmark": name, "result": "skipped (missing)", "target": "-", "seconds": None})
            continue
        cmd = [sys.executable, str(script), "--database-url", args.database_url]
        for flag, on in (("--quick", args.quick), ("--no-plot", args.no_plot)):
            if on and supports(script, flag):
                cmd.append(flag)
        if supports(script, "--output-dir"):
            cmd += ["--output-dir", str(args.output_dir)]
        common.log(f"=== {number}. {name}: {what}\n$ {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        seconds = round(time.monotonic() - t0, 1)
        rows.append({"#": number, "benchmark": name, "result": "ok" if rc == 0 else f"FAILED (exit {rc})",
                     "target": target_of(args.output_dir, name) if rc == 0 else "-", "seconds": seconds})
    print()
    print(common.table(rows, ["#", "benchmark", "result", "target", "seconds"], title="All benchmarks"))
    return 1 if any(r["result"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
