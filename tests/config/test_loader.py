"""The entity config loads the original file unchanged, and names every problem by path and value."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from aibot.config import BotConfig, ConfigError, Entity, check_config, load_config
from aibot.config.models import GB

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "config-aientities.json"
EXAMPLE_DIR = ROOT / "examples" / "entities"

# Every key of section 2.2/2.3 of the original-bot reference (dotted = nested).
REFERENCE_TOP_KEYS = [
    "version", "botSettings.pollingInterval", "botSettings.websocketPort", "botSettings.enableConsoleLogs",
    "botSettings.minSecondsBetweenAnyPost", "botSettings.maxTotalMessagesPerMinute",
    "queueSettings.enabled", "queueSettings.maxConcurrentWorkers", "queueSettings.staleClaimTimeout",
    "queueSettings.maxRetries", "queueSettings.defaultPriority", "queueSettings.congestionThreshold",
    "queueSettings.maxQueueSize", "routerSettings.enabled", "routerSettings.primaryModel",
    "routerSettings.fallbackModel", "routerSettings.temperature", "routerSettings.maxTokens",
    "lmStudioServers", "clusterSettings.pollInterval", "clusterSettings.maxLoadAttempts",
    "clusterSettings.loadBalancingStrategy", "clusterSettings.keepModelsLoaded", "clusterSettings.modelLoadTimeout",
    "clusterSettings.requestTimeout", "clusterSettings.healthCheckInterval", "clusterSettings.maxRetries",
    "clusterSettings.modelUnloadDelay", "globalSettings.minTimeBetweenMessages",
    "globalSettings.maxMessagesPerMinute", "globalSettings.requireHumanActivity", "globalSettings.defaultModel",
    "globalSettings.cloudflareWorkerRateLimits", "globalSettings.brandName", "globalSettings.defaultEntity",
    "globalSettings.contextWindow", "globalSettings.messagesToRead", "globalSettings.globalFilterOut",
    "globalSettings.globalTrimAfter", "globalSettings.globalStopSequences", "monitoring.enableDashboard",
    "monitoring.enableMetrics", "monitoring.metricsRetention", "_configNotes", "_comment", "entities",
]
REFERENCE_ENTITY_KEYS = [
    "id", "enabled", "username", "color", "model", "baseModel", "quantizations", "defaultQuantization",
    "modelServer", "systemRole", "systemPrompt", "userPrompt", "nom", "contextWindow", "messagesToRead",
    "defaultPriority", "temperature", "maxTokens", "max_tokens", "topP", "topK", "repeatPenalty", "minP",
    "responseChance", "rateLimits", "conversationSettings", "traits", "greeting", "filterOut", "trimAfter",
    "trimWhitespace", "addNewlineToContext", "addEntityUsername", "addVariableToContext", "initContext",
    "specialHandler",
]


def example_raw() -> dict:
    return json.loads(EXAMPLE.read_text())


def write(tmp_path: Path, data, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def errors_of(tmp_path: Path, data) -> dict[str, object]:
    result = check_config(write(tmp_path, data))
    assert result.errors, "expected errors"
    return {i.path: i for i in result.errors}


def _has_key(data: dict, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ---------------------------------------------------------------- the original file loads unchanged


def test_example_contains_every_reference_key():
    raw = example_raw()
    missing = [k for k in REFERENCE_TOP_KEYS if not _has_key(raw, k)]
    assert missing == []
    present = {k for e in raw["entities"] for k in e}
    assert [k for k in REFERENCE_ENTITY_KEYS if k not in present] == []
    assert {"supportedFormats", "maxMemory"} <= set(raw["lmStudioServers"][0]["capabilities"])


def test_original_example_loads_without_errors_or_warnings():
    config = load_config(EXAMPLE)
    assert isinstance(config, BotConfig)
    assert config.warnings == []  # every key is known, none reported as unknown
    assert config.version == "v0.2"
    assert [e.id for e in config.entities] == ["the-eternal", "fear-and-loathing", "old-timer", "god-mode"]


def test_example_values_are_mapped_to_snake_case_fields():
    config = load_config(EXAMPLE)
    assert config.bot_settings.polling_interval_ms == 3000
    assert config.queue_settings.stale_claim_timeout_ms == 60000
    assert config.queue_settings.max_concurrent_workers == 6
    assert config.queue_settings.default_priority == 50
    assert config.cluster_settings.keep_models_loaded is True
    assert config.cluster_settings.load_balancing_strategy == "model-affinity"
    assert config.cluster_settings.model_unload_delay_ms == 300000
    assert config.router_settings.max_tokens == 60
    assert config.global_settings.cloudflare_worker_rate_limits["exemptIPs"] == ["127.0.0.1"]

    eternal = config.entity("the-eternal")
    assert eternal is not None and config.entity("nobody") is None
    assert eternal.base_model == "the-eternal" and eternal.default_quantization == "f16"
    assert eternal.quantizations["f32"].model_path == "the-eternal@f32"
    assert eternal.quantizations["f32"].enabled is False
    assert (eternal.temperature, eternal.max_tokens, eternal.top_p, eternal.top_k) == (0.7, 100, 0.8, 40)
    assert (eternal.repeat_penalty, eternal.min_p) == (1.15, 0.5)
    assert eternal.frequency_penalty is None and eternal.presence_penalty is None
    assert eternal.rate_limits.min_seconds_between_posts == 5
    assert eternal.rate_limits.max_posts_per_minute == 10 and eternal.rate_limits.max_posts_per_hour == 300
    assert eternal.trim_whitespace and eternal.add_newline_to_context and eternal.add_entity_username
    assert eternal.response_chance == 0.2 and eternal.traits["mood"] == "serene"
    assert eternal.prompt_mode == "messages" and eternal.context_token_budget == 7692

    old = config.entity("old-timer")
    assert old.nom == 20  # contextWindow, the oldest name
    assert old.max_tokens == 80  # snake_case max_tokens
    assert old.default_priority == 0  # 0 is a valid priority, not "unset"
    assert config.default_priority_for(old) == 0
    assert old.color == "195080200-a1b2c3d4e5"
    assert old.enabled is False and old.model == "old-timer-7b"
    assert config.entity("god-mode").nom == 30  # messagesToRead
    assert config.entity("fear-and-loathing").user_prompt.startswith("Generate a response")


def test_servers_from_lmstudio_servers():
    config = load_config(EXAMPLE)
    first, second = config.servers
    assert first.name == "Mac Studio 2" and first.url == "http://10.0.0.100:1234"
    assert first.kind == "lmstudio" and first.enabled and not second.enabled
    assert first.memory_bytes == 120 * GB == 120_000_000_000
    assert first.system_reserve_bytes == 8_000_000_000
    assert first.per_request_bytes == 3_000_000_000
    assert (first.safety_fraction, first.hard_cap, first.default_parallel, first.token_env) == (0.1, 12, 1, None)


def test_server_extensions_and_top_level_servers(tmp_path):
    raw = example_raw()
    raw["lmStudioServers"] = [{"ip": "10.0.0.5", "port": 1234}]
    raw["servers"] = [
        {"url": "http://gpu:8080/", "kind": "llamacpp", "systemReserveGB": 16, "safetyFraction": 0.2,
         "perRequestGB": 1.5, "hardCap": 4, "defaultParallel": 2, "tokenEnv": "GPU_TOKEN",
         "capabilities": {"maxMemory": 24.5}},
        {"ip": "10.0.0.6", "kind": "ollama", "name": "oll"},
    ]
    config = load_config(write(tmp_path, raw))
    a, b, c = config.servers
    assert a.name == "10.0.0.5:1234"  # name defaults to ip:port
    assert b.name == "gpu:8080" and b.url == "http://gpu:8080" and b.kind == "llamacpp"
    assert b.system_reserve_bytes == 16 * GB and b.per_request_bytes == 1_500_000_000
    assert b.memory_bytes == 24_500_000_000 and b.safety_fraction == 0.2
    assert (b.hard_cap, b.default_parallel, b.token_env) == (4, 2, "GPU_TOKEN")
    assert c.url == "http://10.0.0.6:11434"  # the backend's default port
    assert config.server("oll") is c


def test_directory_form(tmp_path):
    config = load_config(EXAMPLE_DIR)
    assert config.warnings == []
    assert [e.id for e in config.entities] == ["eq-score", "the-eternal"]  # id from the file name
    assert config.version == "v1.0-dir"
    # doc-192 style keys at the top of global.json belong to globalSettings
    assert config.global_settings.global_stop_sequences == ["\nHuman:", "\nUser:"]
    assert [s.name for s in config.servers] == ["studio-a", "ultra-llama", "ollama-box"]
    eternal = config.entity("the-eternal")
    assert eternal.max_tokens == 200 and eternal.frequency_penalty == 0.3 and eternal.max_attempts == 3
    assert eternal.stop_sequences == ["\nTheEternal:"]
    assert config.entity("eq-score").prompt_mode == "legacy"


def test_directory_form_paths_name_the_file(tmp_path):
    (tmp_path / "global.json").write_text(json.dumps({"globalFilterOut": "AI:", "botSettings": {"x": 1}}))
    (tmp_path / "alice.json").write_text(json.dumps({"username": "Alice", "color": "999000000", "model": "m"}))
    (tmp_path / "bob.json").write_text(json.dumps({"id": "robert", "username": "Bob", "color": "000000000",
                                                    "model": "m"}))
    (tmp_path / "carol.json").write_text("{ nope")
    (tmp_path / "notes.txt").write_text("ignored")
    result = check_config(tmp_path)
    by_path = {i.path: i for i in result.errors}
    assert by_path["global.json:globalFilterOut"].value == "AI:"
    assert "red component 999" in by_path["alice.json:color"].message
    assert "entity 'alice'" in by_path["alice.json:color"].message
    assert by_path["bob.json:id"].value == "robert"
    assert "line 1, column 3" in by_path["carol.json"].message


def test_directory_edit_one_entity_without_global(tmp_path):
    (tmp_path / "solo.json").write_text(json.dumps({"username": "Solo", "color": "001002003", "model": "m",
                                                     "rateLimits": {}}))
    config = load_config(tmp_path)
    assert config.entity("solo").username == "Solo"
    assert config.queue_settings.default_priority == 50


# ---------------------------------------------------------------- warnings


def test_unknown_keys_are_kept_and_reported_with_paths(tmp_path):
    raw = example_raw()
    raw["newTopLevel"] = True
    raw["queueSettings"]["turbo"] = 1
    raw["entities"][1]["rateLimits"]["perDay"] = 9
    raw["entities"][0]["quantizations"]["f16"]["sizeGB"] = 7
    raw["lmStudioServers"][0]["capabilities"]["gpu"] = "M2"
    raw["entities"][0]["_note"] = "underscore keys are notes, never warned"
    config = load_config(write(tmp_path, raw))
    paths = {w.path: w for w in config.warnings}
    assert set(paths) == {"newTopLevel", "queueSettings.turbo", "entities[1].rateLimits.perDay",
                          "entities[0].quantizations.f16.sizeGB", "lmStudioServers[0].capabilities.gpu"}
    assert paths["entities[1].rateLimits.perDay"].value == 9
    assert "unknown key" in paths["newTopLevel"].message
    assert config.queue_settings.model_extra["turbo"] == 1  # kept


def test_two_names_for_one_setting_warn_and_the_first_wins(tmp_path):
    raw = example_raw()
    raw["entities"][0]["max_tokens"] = 999
    raw["entities"][0]["messagesToRead"] = 7
    config = load_config(write(tmp_path, raw))
    assert config.entity("the-eternal").max_tokens == 100 and config.entity("the-eternal").nom == 100
    paths = {w.path: w.message for w in config.warnings}
    assert "'maxTokens'" in paths["entities[0].max_tokens"]
    assert "'nom'" in paths["entities[0].messagesToRead"]


def test_missing_rate_limits_mean_unlimited_with_a_warning(tmp_path):
    raw = example_raw()
    del raw["entities"][1]["rateLimits"]
    config = load_config(write(tmp_path, raw))
    assert config.entity("fear-and-loathing").rate_limits is None
    (warning,) = [w for w in config.warnings if w.path == "entities[1].rateLimits"]
    assert "not rate-limited" in warning.message


def test_rgb_colour_is_converted_with_a_warning(tmp_path):
    raw = example_raw()
    raw["entities"][0]["color"] = "rgb(8, 175, 220)"
    config = load_config(write(tmp_path, raw))
    assert config.entity("the-eternal").color == "008175220"
    assert any(w.path == "entities[0].color" and "converted" in w.message for w in config.warnings)


def test_disabled_entity_without_model_is_only_a_warning(tmp_path):
    raw = example_raw()
    del raw["entities"][2]["model"]  # old-timer is disabled
    config = load_config(write(tmp_path, raw))
    assert any(w.path == "entities[2]" and "no model" in w.message for w in config.warnings)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("mutate", "path", "value", "words"), [
    (lambda r: r["entities"][0].update(temperature="hot"), "entities[0].temperature", "hot", "valid number"),
    (lambda r: r["entities"][0].update(enabled="yes"), "entities[0].enabled", "yes", "boolean"),
    (lambda r: r["entities"][0].update(maxTokens=12.5), "entities[0].maxTokens", 12.5, "integer"),
    (lambda r: r["entities"][0].update(color="12345"), "entities[0].color", "12345", "RRRGGGBBB"),
    (lambda r: r["entities"][0].update(color="080175256"), "entities[0].color", "080175256", "blue component 256"),
    (lambda r: r["entities"][0].update(defaultPriority=120), "entities[0].defaultPriority", 120, "99"),
    (lambda r: r["entities"][0].update(defaultPriority=-1), "entities[0].defaultPriority", -1, "0"),
    (lambda r: r["entities"][0].update(systemRole="robot"), "entities[0].systemRole", "robot", "'system'"),
    (lambda r: r["entities"][0].update(promptMode="chat"), "entities[0].promptMode", "chat", "'messages'"),
    (lambda r: r["entities"][1]["rateLimits"].update(maxPostsPerMinute="ten"),
     "entities[1].rateLimits.maxPostsPerMinute", "ten", "integer"),
    (lambda r: r["entities"][0]["quantizations"]["f16"].update(modelPath=5),
     "entities[0].quantizations.f16.modelPath", 5, "string"),
    (lambda r: r["entities"][1].pop("username"), "entities[1].username", None, "missing"),
    (lambda r: r["queueSettings"].update(defaultPriority=100), "queueSettings.defaultPriority", 100, "99"),
    (lambda r: r["lmStudioServers"][0].update(port="1234"), "lmStudioServers[0].port", "1234", "integer"),
    (lambda r: r["lmStudioServers"][0].update(kind="vllm"), "lmStudioServers[0].kind", "vllm", "'lmstudio'"),
    (lambda r: r["lmStudioServers"][0].pop("ip"), "lmStudioServers[0]", ..., "`ip`"),
    (lambda r: r["lmStudioServers"][1].update(name="Mac Studio 2"), "lmStudioServers[1].name", "Mac Studio 2",
     "duplicate"),
    (lambda r: r["entities"][1].update(id="the-eternal"), "entities[1].id", "the-eternal", "duplicate"),
    (lambda r: r.update(escapes="raw"), "escapes", "raw", "'unescape'"),
])
def test_bad_values_are_errors_naming_path_and_value(tmp_path, mutate, path, value, words):
    raw = example_raw()
    mutate(raw)
    issues = errors_of(tmp_path, raw)
    assert path in issues, issues
    if value is not ...:
        assert issues[path].value == value
    assert words in issues[path].message


def test_entity_errors_name_the_entity(tmp_path):
    raw = example_raw()
    raw["entities"][1]["color"] = "red"
    issue = errors_of(tmp_path, raw)["entities[1].color"]
    assert issue.message.startswith("entity 'fear-and-loathing': ")
    assert "'red'" in issue.message


def test_all_errors_are_reported_at_once(tmp_path):
    raw = example_raw()
    raw["entities"][0]["color"] = "x"
    raw["entities"][3]["defaultPriority"] = 120
    raw["botSettings"]["pollingInterval"] = "3s"
    assert {"entities[0].color", "entities[3].defaultPriority", "botSettings.pollingInterval"} <= set(
        errors_of(tmp_path, raw))


def test_enabled_entity_without_model_is_an_error(tmp_path):
    raw = example_raw()
    e = raw["entities"][1]
    for key in ("baseModel", "quantizations", "defaultQuantization"):
        del e[key]
    issue = errors_of(tmp_path, raw)["entities[1]"]
    assert "no model" in issue.message and "fear-and-loathing" in issue.message


def test_missing_entities(tmp_path):
    raw = example_raw()
    del raw["entities"]
    assert "missing" in errors_of(tmp_path, raw)["entities"].message
    raw["entities"] = {"the-eternal": {}}
    assert errors_of(tmp_path, raw)["entities"].value == "object"


def test_invalid_json_reports_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "version": "v1",\n  "entities": [,]\n}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert issue.path == str(path)
    assert "line 3, column 16" in issue.message
    assert "line 3" in str(info.value)


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(write(tmp_path, "[1, 2]"))


def test_config_error_carries_warnings(tmp_path):
    raw = example_raw()
    raw["typo"] = 1
    raw["entities"][0]["color"] = "x"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    assert [w.path for w in info.value.warnings] == ["typo"]


def test_entity_model_usable_directly():
    e = Entity(id="x", username="X", color="001002003", base_model="b", temperature=1)
    assert e.temperature == 1.0 and e.nom == 100 and e.default_priority is None
    assert copy.deepcopy(e) == e


def test_null_means_default(tmp_path):
    raw = example_raw()
    raw["entities"][1].update(filterOut=None, enabled=None, nom=None, topK=None)
    raw["queueSettings"]["defaultPriority"] = None
    config = load_config(write(tmp_path, raw))
    e = config.entity("fear-and-loathing")
    assert (e.filter_out, e.enabled, e.nom, e.top_k) == ([], True, 100, None)
    assert config.queue_settings.default_priority == 50
    raw["entities"][1]["username"] = None
    assert "got null" in errors_of(tmp_path, raw)["entities[1].username"].message


def test_demand_keys_parse_and_bad_values_name_the_field():
    from aibot.config import ConfigError, load_config
    from aibot.harness import entity

    def load(tmp, cluster=None, queue=None, models=None):
        doc = {"entities": [entity("alice", "m-1")], "clusterSettings": cluster or {},
               "queueSettings": queue or {}, "models": models or {}}
        p = tmp / "c.json"
        p.write_text(json.dumps(doc))
        return load_config(str(p))

    import tempfile
    from pathlib import Path
    tmp = Path(tempfile.mkdtemp())
    c = load(tmp)
    assert c.queue_settings.max_concurrent_workers is None              # absent: no cap
    assert (c.cluster_settings.min_residency_seconds, c.cluster_settings.residency_per_load_second,
            c.cluster_settings.min_residency_floor_seconds) == (120.0, 10.0, 5.0)
    c = load(tmp, {"minResidencySeconds": 60, "residencyPerLoadSecond": 4, "minResidencyFloorSeconds": 2,
                   "replicaQueueFactor": 3, "maxReplicas": 2, "keepModelsLoaded": False},
             {"maxConcurrentWorkers": 1}, {"m-1": {"idleTtlSeconds": 90}})
    assert c.queue_settings.max_concurrent_workers == 1
    assert c.cluster_settings.max_replicas == 2 and c.models["m-1"].idle_ttl_seconds == 90
    for cluster, queue, field in (({"minResidencyFloorSeconds": 200}, {}, "minResidencyFloorSeconds"),
                                  ({"replicaQueueFactor": 0}, {}, "replicaQueueFactor"),
                                  ({}, {"maxConcurrentWorkers": 0}, "maxConcurrentWorkers")):
        with pytest.raises(ConfigError, match=field):
            load(tmp, cluster, queue)
