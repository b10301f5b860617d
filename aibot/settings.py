"""Process settings: where the database, broker, config file and chat API are, and worker knobs.

These describe the deployment, not the personas, so they come from the environment (12-factor,
systemd/launchd units, containers) and never from the entity JSON, which operators edit live and
may share. An optional TOML file (`AIBOT_SETTINGS_FILE`, keys = the lowercase field names) holds the
same values for hosts where a file is easier; the environment wins over it.

Secrets (the chat API token, passwords inside URLs) never appear in repr/str output, so logging a
Settings object is safe. Tokens can come from `<VAR>_FILE` (Docker/systemd credentials style).
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from aibot.log import default_worker_name

PREFIX = "AIBOT_"
SETTINGS_FILE_VAR = "AIBOT_SETTINGS_FILE"
# Fields that may also be given as <VAR>_FILE (a path whose contents are the value).
FILE_CAPABLE = ("database_url", "broker_url", "chat_api_token")
# Variable names that are not simply AIBOT_<FIELD> (kept as docs/internals.md names them).
ENV_NAMES = {"config_path": "AIBOT_CONFIG"}


def env_var(field: str) -> str:
    return ENV_NAMES.get(field, PREFIX + field.upper())


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable (never a secret's value)."""


class _HasTokenEnv(Protocol):
    token_env: str | None


def _redact_url(url: str | None) -> str | None:
    if url is None:
        return None
    from aibot.db import redact_url  # lazy: keeps `import aibot.settings` free of psycopg

    return redact_url(url)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str | None = None
    broker_url: str | None = None  # default: the database URL (dramatiq-postgres)
    config_path: str = "config-aientities.json"
    chat_api_url: str | None = None
    chat_api_token: SecretStr | None = None
    lease_seconds: int = Field(600, ge=1)
    aging_seconds: float = Field(30.0, ge=0)
    worker_name: str = Field(default_factory=default_worker_name)

    @field_validator("database_url", "broker_url", "chat_api_url", "config_path", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

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
            var = env_var(name)
            if var in env:
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
        return Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {file_name!r}: {exc.strerror or exc}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests call `reset_settings()` after changing the env."""
    return Settings.from_sources()


def reset_settings() -> None:
    get_settings.cache_clear()


def server_token(server: _HasTokenEnv, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token for a server whose config names `tokenEnv` (from that variable, or from the file
    named by `<tokenEnv>_FILE`); None when the server needs none or the variable is unset."""
    name = getattr(server, "token_env", None)
    if not name:
        return None
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    file_name = env.get(f"{name}_FILE")
    if file_name:
        return _read_secret_file(f"{name}_FILE", file_name) or None
    return None
