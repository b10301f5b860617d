"""Process settings from env and TOML; secrets never printed."""

from __future__ import annotations

import pytest

from aibot.config import ServerConfig
from aibot.settings import Settings, SettingsError, get_settings, reset_settings, server_token

SECRET = "s3cr3t-token-value"


def test_defaults():
    s = Settings.from_sources({})
    assert s.database_url is None and s.broker_url is None
    assert s.config_path == "config-aientities.json"
    assert (s.lease_seconds, s.aging_seconds) == (20, 30.0)
    assert (s.renewal_seconds(), s.heartbeat_fresh_seconds()) == (5.0, 20.0), "renewal a quarter of the lease; live for one lease"
    assert s.chat_api_token is None and s.chat_token() is None
    assert s.worker_name.startswith("worker@")


def test_environment_variables():
    s = Settings.from_sources({
        "AIBOT_DATABASE_URL": "postgresql://bot:pw@db:5432/aibot",
        "AIBOT_CONFIG": "/etc/aibot/entities",
        "AIBOT_CHAT_API_URL": "https://chat.example/api",
        "AIBOT_CHAT_API_TOKEN": SECRET,
        "AIBOT_LEASE_SECONDS": "120",
        "AIBOT_AGING_SECONDS": "2.5",
        "AIBOT_WORKER_NAME": "w1",
    })
    assert s.database_url == "postgresql://bot:pw@db:5432/aibot"
    assert s.broker_url == s.database_url  # default broker = the database (dramatiq-postgres)
    assert s.config_path == "/etc/aibot/entities" and s.chat_api_url == "https://chat.example/api"
    assert s.chat_token() == SECRET
    assert (s.lease_seconds, s.aging_seconds, s.worker_name) == (120, 2.5, "w1")


def test_explicit_broker():
    s = Settings.from_sources({"AIBOT_DATABASE_URL": "postgresql://a/b", "AIBOT_BROKER_URL": "redis://r:6379/0"})
    assert s.broker_url == "redis://r:6379/0"


def test_toml_file_and_env_wins(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    toml = tmp_path / "aibot.toml"
    toml.write_text(f'database_url = "postgresql://toml/db"\nlease_seconds = 900\nworker_name = "from-toml"\n'
                    f'chat_api_token_file = "{token_file}"\n')
    s = Settings.from_sources({"AIBOT_SETTINGS_FILE": str(toml), "AIBOT_WORKER_NAME": "from-env"})
    assert s.database_url == "postgresql://toml/db" and s.lease_seconds == 900
    assert s.worker_name == "from-env"
    assert s.chat_token() == SECRET  # trailing newline stripped


def test_token_file_variable(tmp_path):
    f = tmp_path / "tok"
    f.write_text(SECRET)
    assert Settings.from_sources({"AIBOT_CHAT_API_TOKEN_FILE": str(f)}).chat_token() == SECRET
    # the direct variable wins over the file
    s = Settings.from_sources({"AIBOT_CHAT_API_TOKEN_FILE": str(f), "AIBOT_CHAT_API_TOKEN": "direct"})
    assert s.chat_token() == "direct"


def test_secrets_are_redacted_in_repr_and_str():
    s = Settings.from_sources({"AIBOT_CHAT_API_TOKEN": SECRET,
                               "AIBOT_DATABASE_URL": "postgresql://bot:hunter2@db/aibot"})
    for text in (repr(s), str(s), f"{s}"):
        assert SECRET not in text and "hunter2" not in text
        assert "***" in text
    assert "**********" in repr(s.chat_api_token)


def test_bad_values_name_the_variable_but_not_secrets(tmp_path):
    with pytest.raises(SettingsError, match="AIBOT_LEASE_SECONDS") as info:
        Settings.from_sources({"AIBOT_LEASE_SECONDS": "ten"})
    assert "'ten'" in str(info.value)
    with pytest.raises(SettingsError, match="AIBOT_LEASE_SECONDS"):
        Settings.from_sources({"AIBOT_LEASE_SECONDS": "0"})
    with pytest.raises(SettingsError, match="AIBOT_CHAT_API_TOKEN_FILE") as info:
        Settings.from_sources({"AIBOT_CHAT_API_TOKEN_FILE": str(tmp_path / "missing")})
    toml = tmp_path / "s.toml"
    toml.write_text('lease_secs = 5\n')
    with pytest.raises(SettingsError, match="unknown setting 'lease_secs'"):
        Settings.from_sources({"AIBOT_SETTINGS_FILE": str(toml)})
    toml.write_text('lease_seconds = \n')
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.from_sources({"AIBOT_SETTINGS_FILE": str(toml)})
    with pytest.raises(SettingsError, match="not found"):
        Settings.from_sources({"AIBOT_SETTINGS_FILE": str(tmp_path / "nope.toml")})


def test_get_settings_is_cached_and_resettable(monkeypatch):
    monkeypatch.delenv("AIBOT_SETTINGS_FILE", raising=False)
    monkeypatch.setenv("AIBOT_WORKER_NAME", "first")
    reset_settings()
    try:
        a = get_settings()
        monkeypatch.setenv("AIBOT_WORKER_NAME", "second")
        assert get_settings() is a and a.worker_name == "first"
        reset_settings()
        assert get_settings().worker_name == "second"
    finally:
        reset_settings()


def test_server_token(tmp_path):
    server = ServerConfig(ip="h", token_env="GPU_TOKEN")
    assert server_token(server, {}) is None
    assert server_token(server, {"GPU_TOKEN": SECRET}) == SECRET
    f = tmp_path / "t"
    f.write_text(SECRET + "\n")
    assert server_token(server, {"GPU_TOKEN_FILE": str(f)}) == SECRET
    assert server_token(ServerConfig(ip="h"), {"GPU_TOKEN": SECRET}) is None


def test_every_field_has_one_variable():
    from aibot.settings import variable

    names = {variable(f) for f in Settings.model_fields}
    assert len(names) == len(Settings.model_fields)
    assert variable("config_path") == "AIBOT_CONFIG" and variable("worker_pool") == "AIBOT_WORKER_POOL"
    assert variable("backend_read_timeout") == "AIBOT_BACKEND_READ_TIMEOUT"


def test_process_knobs_from_the_environment():
    s = Settings.from_sources({
        "AIBOT_WORKER_POOL": "6", "AIBOT_WORKER_SYNC_COMMIT": "1", "AIBOT_STREAM": "0",
        "AIBOT_INVOCATION_BUDGET_SECONDS": "10", "AIBOT_SHUTDOWN_TIMEOUT": "5", "AIBOT_ACTOR_TIME_LIMIT_SECONDS": "60",
        "AIBOT_BACKEND_READ_TIMEOUT": "0.5", "AIBOT_ORPHAN_LOAD_GRACE_SECONDS": "0.3",
        "AIBOT_RETENTION_SECONDS": "3600", "AIBOT_SCHEDULE_REFRESH": "5s", "AIBOT_SINK": "Dry-Run",
        "AIBOT_CHAT_DOMAIN": "example.org", "AIBOT_LOG_LEVEL": "debug",
    })
    assert (s.worker_pool, s.worker_sync_commit, s.stream) == (6, True, False)
    assert (s.invocation_budget_seconds, s.shutdown_timeout, s.actor_time_limit_seconds) == (10, 5, 60)
    assert s.backend_timeouts() == {"read": 0.5} and s.orphan_load_grace_seconds == 0.3
    assert (s.retention_seconds, s.schedules) == (3600, {"refresh": "5s"})
    assert (s.sink, s.chat_domain, s.log_level) == ("dry-run", "example.org", "debug")


@pytest.mark.parametrize("var, value", [
    ("AIBOT_WORKER_POOL", "0"), ("AIBOT_STREAM", "sometimes"), ("AIBOT_BACKEND_READ_TIMEOUT", "-1"),
    ("AIBOT_INVOCATION_BUDGET_SECONDS", "soon"), ("AIBOT_RETENTION_SECONDS", "0"),
])
def test_a_malformed_knob_names_its_variable(var, value):
    with pytest.raises(SettingsError, match=var):
        Settings.from_sources({var: value})


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_aging_zero_is_refused_by_the_queues_one_rule(value):
    """0 would not mean "no aging" but "priority counts for nothing"; settings apply the queue's rule."""
    with pytest.raises(SettingsError, match="AIBOT_AGING_SECONDS") as info:
        Settings.from_sources({"AIBOT_AGING_SECONDS": value})
    if value != "soon":
        assert "aging_seconds must be a finite number > 0" in str(info.value)


def test_worker_id_is_the_set_name_with_the_pid_else_role_at_host():
    import os

    assert Settings.from_sources({"AIBOT_WORKER_NAME": "gpu-a"}).worker_id() == f"gpu-a:{os.getpid()}"
    assert Settings.from_sources({}).worker_id("bot").startswith("bot@")


def test_a_settings_files_broker_is_the_one_doorbells_and_workers_use(tmp_path, monkeypatch):
    from aibot.queue import broker, doorbell

    toml = tmp_path / "aibot.toml"
    toml.write_text('database_url = "postgresql://db/aibot"\nbroker_url = "redis://127.0.0.1:6379/3"\n')
    for var in ("AIBOT_DATABASE_URL", "AIBOT_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIBOT_SETTINGS_FILE", str(toml))
    reset_settings()
    assert broker.broker_url() == "redis://127.0.0.1:6379/3" and broker.broker_kind() == "redis"
    assert not doorbell._broker_is_postgres(), "the ingest's doorbells go through the Redis broker, not SQL"
    toml.write_text('database_url = "postgresql://db/aibot"\n')
    reset_settings()
    assert broker.broker_url() == "postgresql://db/aibot" and doorbell._broker_is_postgres()


def test_an_empty_secret_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="AIBOT_SERVE_TOKEN_FILE.*is empty"):
        Settings.from_sources({"AIBOT_SERVE_TOKEN_FILE": str(empty)})


def test_every_variable_the_settings_read_is_in_docs_configuration_and_nothing_else_is():
    """docs/configuration.md lists exactly the AIBOT_* variables aibot.settings reads (and the shell
    variables of the deploy units, which are named as such), so neither can drift from the other."""
    import re
    from pathlib import Path

    from aibot import settings as settings_mod

    read = {settings_mod.variable(name) for name in Settings.model_fields if name != "schedules"}
    read |= {f"{settings_mod.variable(name)}_FILE" for name in settings_mod.FILE_CAPABLE}
    read |= {settings_mod.SETTINGS_FILE_VAR, f"{settings_mod.SCHEDULE_PREFIX}<JOB>", "AIBOT_<FIELD>"}
    from aibot.scheduler import jobs as scheduled
    schedule_vars = {settings_mod.schedule_variable(s.name) for s in scheduled.schedules()}
    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    table = {m for m in re.findall(r"`(AIBOT_[A-Z0-9_<>]+)`", text)}
    table |= {f"{v}_FILE" for v in re.findall(r"`(AIBOT_[A-Z0-9_]+)` \(or `_FILE`\)", text)}
    deploy_only = {"AIBOT_WORKER_PROCESSES", "AIBOT_WORKER_THREADS"}   # read by the units' shell, not by aibot
    assert read - table == set(), f"read by aibot.settings but not in docs/configuration.md: {sorted(read - table)}"
    assert deploy_only <= table, "the deploy units' shell variables are documented too"
    assert table - read - deploy_only - schedule_vars == set(), \
        f"in docs/configuration.md but read by no setting: {sorted(table - read - deploy_only - schedule_vars)}"
