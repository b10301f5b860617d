"""Process settings: where the database, broker, config file and chat API are, and every process knob.

These describe the deployment, not the personas, so they come from the environment (12-factor,
systemd/launchd units, containers) and never from the entity JSON, which operators edit live and
may share. An optional TOML file (`AIBOT_SETTINGS_FILE`, keys = the field names) holds the same values
for hosts where a file is easier; the environment wins over it.

This is the one place that reads aibot's environment variables: every field is one variable
(`variable(field)`: `AIBOT_<FIELD>`, except `config_path` = `AIBOT_CONFIG`), plus the scheduled jobs'
`AIBOT_SCHEDULE_<JOB>` collected into `schedules`. A malformed value is a SettingsError naming the
variable (or the TOML key), never showing a secret. Other modules take a `Settings` (or call
`get_settings()`) instead of reading `os.environ`; variables that are not aibot's (a server's own
`tokenEnv`, `NO_COLOR`, Dramatiq's `dramatiq_*`) are read where they are used.

Secrets (the chat API and serve tokens, passwords inside URLs) never appear in repr/str output, so
logging a Settings object is safe. Secrets can come from `<VAR>_FILE` (Docker/systemd credentials).
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from aibot.log import default_worker_name
from aibot.queue.policy import DEFAULT_AGING_SECONDS, validate_aging

PREFIX = "AIBOT_"
SETTINGS_FILE_VAR = "AIBOT_SETTINGS_FILE"
SCHEDULE_PREFIX = "AIBOT_SCHEDULE_"
# Fields that may also be given as <VAR>_FILE (a path whose contents are the value).
FILE_CAPABLE = ("database_url", "broker_url", "chat_api_token", "serve_token")
# Variable names that are not simply AIBOT_<FIELD> (kept as the deployments name them).
ENV_NAMES = {"config_path": "AIBOT_CONFIG"}
#: The backend timeouts a deployment (or a chaos test) may lower: backend_<name>_timeout seconds.
BACKEND_TIMEOUTS = ("connect", "read", "write", "total", "load")
#: A worker renews its leases and heartbeat this many times per lease (`Settings.renewal_seconds`).
RENEWALS_PER_LEASE = 4


def variable(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_NAMES.get(field, PREFIX + field.upper())


def schedule_variable(job: str) -> str:
    return f"{SCHEDULE_PREFIX}{job.upper()}"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable (never a secret's value)."""


class _HasTokenEnv(Protocol):
    token_env: str | None


def redact_url(url: str) -> str:
    """A database or broker URL with any password replaced, for logs and status output."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)(\S+)", r"\1***", url)


def _redact_url(url: str | None) -> str | None:
    return None if url is None else redact_url(url)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str | None = None
    broker_url: str | None = None  # default: the database URL (dramatiq-postgres)
    config_path: str = "config-aientities.json"
    chat_api_url: str | None = None
    chat_api_token: SecretStr | None = None
    chat_domain: str | None = None           # the chat's `domain` on replies (aibot.delivery.sinks)
    sink: str | None = None                  # chat | postgres | dry-run; default: chat with a chat URL
    # 20 s: a killed worker's job is queued again within a lease plus one reclaim tick (5 s), 25 s at
    # worst. The lease is renewed every quarter of it (`renewal_seconds`), so three renewals may fail
    # (a database restart) before a live worker loses a job.
    lease_seconds: int = Field(20, ge=1)
    aging_seconds: float = DEFAULT_AGING_SECONDS
    # Processes of one host share the environment: a set name is suffixed with the pid (`worker_id`).
    worker_name: str = Field(default_factory=default_worker_name)
    worker_pool: int = Field(16, ge=1)       # connections per worker process
    worker_sync_commit: bool = False         # wait for the WAL flush at every worker commit
    stream: bool = True                      # stream replies (a shutdown can stop a generation between tokens)
    invocation_budget_seconds: float = Field(30.0, gt=0)
    actor_time_limit_seconds: float = Field(1200.0, gt=0)
    shutdown_timeout: float = Field(30.0, ge=0)
    backend_connect_timeout: float | None = Field(None, gt=0)
    backend_read_timeout: float | None = Field(None, gt=0)
    backend_write_timeout: float | None = Field(None, gt=0)
    backend_total_timeout: float | None = Field(None, gt=0)
    backend_load_timeout: float | None = Field(None, gt=0)
    orphan_load_grace_seconds: float = Field(300.0, ge=0)
    retention_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    schedules: dict[str, str] = Field(default_factory=dict)   # job -> schedule text (AIBOT_SCHEDULE_<JOB>)
    serve_token: SecretStr | None = None
    log_level: str | None = None
    demo_pgdata: str | None = None           # where `aibot demo` keeps its embedded PostgreSQL

    @field_validator("database_url", "broker_url", "chat_api_url", "config_path", "chat_domain", "sink",
                     "log_level", "demo_pgdata", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("sink", "log_level")
    @classmethod
    def _normalised(cls, value: str | None) -> str | None:
        return None if value is None else value.strip().lower()

    @field_validator("aging_seconds", mode="before")
    @classmethod
    def _aging_rule(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"expected a number of seconds, got {value!r}") from None
        return validate_aging(value)   # the queue's one rule: > 0 (0 is refused, not "no aging")

    @field_validator("schedules", mode="before")
    @classmethod
    def _schedule_names(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k).lower(): v for k, v in value.items()}
        return value

    @model_validator(mode="before")
    @classmethod
    def _broker_defaults_to_database(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("broker_url") and data.get("database_url"):
            data = {**data, "broker_url": data["database_url"]}
        return data

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            if name in ("database_url", "broker_url"):
                value = _redact_url(value)
            yield name, value

    def chat_token(self) -> str | None:
        """The chat API token in clear, for the one place that sends it."""
        return None if self.chat_api_token is None else self.chat_api_token.get_secret_value()

    def worker_id(self, role: str = "worker") -> str:
        """The name this process registers under: `<worker_name>:<pid>` when a name was set (several
        processes of one host share the environment, so the pid keeps names unique), else
        `<role>@<host>:<pid>`."""
        if "worker_name" in self.model_fields_set:
            return f"{self.worker_name}:{os.getpid()}"
        return default_worker_name(role)

    def renewal_seconds(self) -> float:
        """How often a worker renews the leases it holds and its heartbeat (one transaction): a quarter
        of the lease, so a lease survives three failed renewals."""
        return max(0.25, self.lease_seconds / RENEWALS_PER_LEASE)

    def heartbeat_fresh_seconds(self) -> float:
        """The one freshness rule: a process is live while its heartbeat is younger than a lease
        (`RENEWALS_PER_LEASE` renewals); older, it is as dead as the jobs the reclaim takes back from it."""
        return float(self.lease_seconds)

    def backend_timeouts(self) -> dict[str, float]:
        """The backend timeouts this deployment overrides, by `aibot.backends.Timeouts` field name."""
        return {name: value for name in BACKEND_TIMEOUTS
                if (value := getattr(self, f"backend_{name}_timeout")) is not None}

    @classmethod
    def from_sources(cls, environ: Mapping[str, str] | None = None,
                     settings_file: str | os.PathLike[str] | None = None) -> Settings:
        """TOML file values, overridden by environment variables; errors name the variable/key."""
        env = os.environ if environ is None else environ
        file_name = settings_file if settings_file is not None else env.get(SETTINGS_FILE_VAR)
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        if file_name:
            for key, value in _read_toml(Path(file_name)).items():
                values[key], origin[key] = value, f"{file_name}: {key}"
        for name in cls.model_fields:
            var = variable(name)
            if name == "schedules":
                found = {k[len(SCHEDULE_PREFIX):].lower(): v for k, v in env.items() if k.startswith(SCHEDULE_PREFIX)}
                if found:
                    values[name] = {**values.get(name, {}), **found}
                    origin[name] = f"{SCHEDULE_PREFIX}<JOB>"
            elif var in env:
                values[name], origin[name] = env[var], var
            elif name in FILE_CAPABLE and f"{var}_FILE" in env:
                values[name], origin[name] = _read_secret_file(f"{var}_FILE", env[f"{var}_FILE"]), f"{var}_FILE"
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else "?"
                where = origin.get(field, field)
                shown = "" if field in FILE_CAPABLE else f" (got {err.get('input')!r})"
                problems.append(f"{where}: {err['msg']}{shown}")
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{SETTINGS_FILE_VAR}: settings file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{SETTINGS_FILE_VAR}: {str(path)!r} is not valid TOML: {exc}") from None
    known = set(Settings.model_fields)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key.endswith("_file") and key[: -len("_file")] in FILE_CAPABLE:
            base = key[: -len("_file")]
            if base not in data:
                out[base] = _read_secret_file(f"{path}: {key}", str(value))
        elif key in known:
            out[key] = value
        else:
            raise SettingsError(f"{path}: unknown setting {key!r}; expected one of {', '.join(sorted(known))}")
    return out


def _read_secret_file(what: str, file_name: str) -> str:
    """A secret from a file, without the trailing newline editors add; errors never show contents."""
    try:
        value = Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {file_name!r}: {exc.strerror or exc}") from None
    if not value.strip():
        raise SettingsError(f"{what}: {file_name!r} is empty")
    return value


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests call `reset_settings()` after changing the env."""
    return Settings.from_sources()


def reset_settings() -> None:
    get_settings.cache_clear()


def token_from_env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A server's API token from the variable its config names in `tokenEnv`, or from the file named
    by `<tokenEnv>_FILE`; None when the variable is unset or empty. These are the operator's own
    variables, not aibot's settings."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    file_name = env.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text(encoding="utf-8").rstrip("\r\n") or None
        except OSError as exc:
            raise SettingsError(f"{name}_FILE: cannot read {file_name!r}: {exc.strerror or exc}") from None
    return None


def server_token(server: _HasTokenEnv, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token for a server whose config names `tokenEnv`; None when it needs none."""
    name = getattr(server, "token_env", None)
    return token_from_env(name, environ) if name else None
