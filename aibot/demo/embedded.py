"""An embedded PostgreSQL (pgserver) for `aibot demo` on a machine that has no Postgres.

pgserver ships PostgreSQL binaries in a wheel and runs them on a Unix socket only (no TCP port), so
the demo cannot collide with, or silently use, a Postgres already listening on 127.0.0.1:5432.

Two pgserver behaviours shape this module:
- As root it runs postgres as a system user `pgserver` (created with `useradd` if missing) and adds
  group/other read+execute to every parent directory of the data directory. Under /root that would open
  root's home, so as root the data directory defaults to /var/lib/aibot/pgdata (or /tmp/aibot-pgdata).
- It stops the server only when the last process that opened it exits, counted in
  `<pgdata>/.handle_pids.json`. A demo killed with SIGKILL leaves its pid there and the next run would
  never stop the server, so dead pids are pruned before opening, and `stop()` verifies the postmaster
  is gone (pg_ctl stop, then SIGTERM/SIGKILL) instead of trusting the count.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("aibot.demo.embedded")

DEMO_DATABASE = "aibot_demo"


class EmbeddedError(RuntimeError):
    """The embedded PostgreSQL cannot be used; the message says why and what to do."""


def default_pgdata(environ: Mapping[str, str], euid: int, home: str | os.PathLike[str],
                   writable=os.access) -> Path:
    """Where the demo keeps its data directory (reused across runs, so initdb runs once).

    The settings' `demo_pgdata` (AIBOT_DEMO_PGDATA) wins. Otherwise a normal user gets
    `$XDG_DATA_HOME/aibot/pgdata` (default `~/.local/share/aibot/pgdata`); root gets
    /var/lib/aibot/pgdata when /var/lib is writable, else /tmp/aibot-pgdata, because pgserver opens read
    access on every parent of the data directory.
    """
    from aibot.settings import Settings

    explicit = Settings.from_sources(environ).demo_pgdata
    if explicit:
        return Path(explicit).expanduser()
    if euid == 0:
        var_lib = Path("/var/lib")
        if var_lib.is_dir() and writable(var_lib, os.W_OK):
            return var_lib / "aibot" / "pgdata"
        return Path("/tmp/aibot-pgdata")
    base = environ.get("XDG_DATA_HOME", "").strip() or str(Path(home) / ".local" / "share")
    return Path(base) / "aibot" / "pgdata"


def live_pids(pids: Any, alive=psutil.pid_exists) -> list[int]:
    """The pids of a `.handle_pids.json` list that still run; anything malformed counts as empty."""
    if not isinstance(pids, list):
        return []
    return [p for p in pids if isinstance(p, int) and not isinstance(p, bool) and alive(p)]


def prune_handle_pids(pgdata: Path) -> list[int]:
    """Drops pids of processes that died without closing their pgserver handle; returns what was dropped."""
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        pids = None
    keep = live_pids(pids)
    dropped = [p for p in pids if p not in keep] if isinstance(pids, list) else []
    if dropped or not isinstance(pids, list):
        path.write_text(json.dumps(keep))
    return dropped


@dataclass
class EmbeddedPostgres:
    """One pgserver instance for the duration of a demo; `stop()` leaves no postgres process behind."""

    pgdata: Path
    _server: Any = field(default=None, repr=False)
    _postmaster: psutil.Process | None = field(default=None, repr=False)

    def start(self) -> str:
        """Starts (or joins) the server and returns its maintenance URL (database `postgres`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # platformdirs warns about XDG_RUNTIME_DIR on import
            try:
                import pgserver
            except ImportError:
                raise EmbeddedError("no database: set AIBOT_DATABASE_URL, or install the embedded PostgreSQL "
                                    "with: pip install 'aibot[embedded]'  (pgserver)") from None
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        try:
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedError(f"cannot create the data directory's parent {self.pgdata.parent}: {exc.strerror}; "
                                "set AIBOT_DEMO_PGDATA to a writable path") from None
        if self.pgdata.exists():
            dropped = prune_handle_pids(self.pgdata)
            if dropped:
                log.info("embedded postgres: forgot dead demo process(es) %s", dropped)
        try:
            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:   # initdb/pg_ctl failures arrive as CalledProcessError/AssertionError
            raise EmbeddedError(f"embedded PostgreSQL failed to start in {self.pgdata}: {exc!r} "
                                f"(see {self.pgdata / 'log'})") from None
        pid = self._server.get_pid()
        self._postmaster = psutil.Process(pid) if pid else None
        return self._server.get_uri()

    @property
    def pid(self) -> int | None:
        return self._postmaster.pid if self._postmaster is not None else None

    def url(self, database: str) -> str:
        return self._server.get_uri(database)

    def running(self) -> bool:
        return self._postmaster is not None and self._postmaster.is_running() \
            and self._postmaster.status() != psutil.STATUS_ZOMBIE

    def stop(self, timeout: float = 15.0) -> None:
        """Stops the server (fast shutdown) and waits until the postmaster has exited."""
        if self._server is None:
            return
        try:
            self._server.cleanup()
        except Exception as exc:  # noqa: BLE001 - fall through to the direct stop below
            log.warning("embedded postgres: pgserver cleanup failed (%r); stopping it directly", exc)
        others = self.other_handles()
        if others and self.running():
            # Another live demo uses this data directory; the last one out stops the server.
            log.info("embedded postgres left running for process(es) %s", others)
            self._server = None
            return
        if self.running():
            # pg_ctl failed or a stale handle count kept pgserver from stopping it: stop it here.
            self._pg_ctl_stop()
        if self.running():
            proc = self._postmaster
            proc.terminate()
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._server = None

    def other_handles(self) -> list[int]:
        """Live processes other than this one that still hold a pgserver handle on the data directory."""
        try:
            pids = json.loads((self.pgdata / ".handle_pids.json").read_text())
        except (OSError, ValueError):
            return []
        return [p for p in live_pids(pids) if p != os.getpid()]

    def _pg_ctl_stop(self) -> None:
        from pgserver import _commands

        try:
            _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata,
                             user=getattr(self._server, "system_user", None), timeout=30)
        except Exception as exc:  # noqa: BLE001
            log.warning("embedded postgres: pg_ctl stop failed: %r", exc)
