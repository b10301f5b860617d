"""Hot reload: operators edit prompts while the bot runs, and the next message must see the edit.

The original re-parsed the whole file on every message. `ConfigStore.get()` instead compares a cheap
signature (one `stat` per file: mtime, size, inode; for a directory also the set of file names) and
re-parses only when it changed. A bad edit must not take the bot down mid-conversation, so the last
good config stays in use and the problems are logged once per bad version, not on every call.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Callable

from aibot.config.issues import ConfigError, Issue
from aibot.config.loader import load_config
from aibot.config.models import BotConfig

log = logging.getLogger("aibot.config")

Signature = tuple


def signature(path: Path) -> Signature:
    """What must change for the config to have changed; raises OSError if the path is gone.
    One stat for a file; for a directory one listing plus one stat per JSON file."""
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        return (("", st.st_mtime_ns, st.st_size, st.st_ino),)
    parts = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.is_file():
                fs = entry.stat()
                parts.append((entry.name, fs.st_mtime_ns, fs.st_size, fs.st_ino))
    return tuple(sorted(parts))


class ConfigStore:
    def __init__(self, path: str | os.PathLike[str], *, loader: Callable[[Path], BotConfig] = load_config):
        self.path = Path(path)
        self._loader = loader
        self._lock = threading.Lock()
        self._config: BotConfig | None = None
        self._signature: Signature | None = None
        self._failed_signature: Signature | None = None
        self.last_error: ConfigError | None = None
        self.loads = 0  # successful (re)loads, for tests and status output

    def get(self) -> BotConfig:
        """The current config; the first call raises ConfigError if the config is invalid."""
        with self._lock:
            try:
                sig = signature(self.path)
            except OSError as exc:
                missing = (("<unreadable>", exc.errno or 0, 0, 0),)
                return self._keep(missing, ConfigError(
                    [Issue(str(self.path), None, f"cannot read: {exc.strerror or exc}")], source=str(self.path)))
            if self._config is not None and sig == self._signature:
                return self._config
            if sig == self._failed_signature and self._config is not None:
                return self._config
            try:
                config = self._loader(self.path)
            except ConfigError as exc:
                return self._keep(sig, exc)
            self._config, self._signature, self._failed_signature, self.last_error = config, sig, None, None
            self.loads += 1
            log.info("loaded config %s: %d entities, %d servers%s", self.path, len(config.entities),
                     len(config.servers), f", {len(config.warnings)} warning(s)" if config.warnings else "")
            for warning in config.warnings:
                log.warning("config %s: %s", self.path, warning)
            return config

    @property
    def fingerprint(self) -> str | None:
        """Changes whenever the configuration in use changes (a permanent refusal of a model is retried
        then); None before the first good load."""
        import hashlib

        with self._lock:
            sig = self._signature
        return None if sig is None else hashlib.sha256(repr(sig).encode()).hexdigest()[:16]

    def reload(self) -> BotConfig:
        """Forget the signature and read again (for an explicit operator request)."""
        with self._lock:
            self._signature = self._failed_signature = None
        return self.get()

    def _keep(self, sig: Signature, error: ConfigError) -> BotConfig:
        first_time = sig != self._failed_signature
        self._failed_signature = sig
        self.last_error = error
        if self._config is None:
            raise error
        if first_time:
            log.error("config %s is invalid; keeping the last good version. %s", self.path, error)
        return self._config
