"""The INFERENCE_CONFIG file: settings beneath the environment, backends and aliases, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference_core.config import ConfigError, LBPolicy, ProviderType, Settings, load_settings
from inference_core.config_file import BackendConfig, FleetConfig, Target, load_fleet

EXAMPLE = """\
backends:
  local:
    provider: vllm
    base_url: [http://vllm-0:8000/v1, http://vllm-1:8000/v1]
    api_key: ${VLLM_API_KEY}
    lb_policy: prefix_affinity
    max_concurrent_tasks: 400
    rate_limit_rps: 0
    timeout: 120
  openai:
    provider: openai
    base_url: https://api.openai.com/v1
    api_key: ${OPENAI_API_KEY}
    models: [gpt-4o, gpt-4o-mini, "o*"]
models:
  chat:
    target: local/meta-llama/Llama-3.1-8B-Instruct
    fallbacks: [openai/gpt-4o-mini]
  gpt-4o:
    target: openai/gpt-4o
    fallbacks: [local/meta-llama/Llama-3.1-8B-Instruct]
default_model: chat
"""
SECRET = "sk-do-not-print"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.upper().startswith("INFERENCE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inference.yaml"
    path.write_text(text)
    return path


def load(path: Path, **flags: str) -> tuple[Settings, FleetConfig]:
    settings = load_settings(config=str(path), **flags)
    return settings, load_fleet(settings)


def problem(path: Path, **flags: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, **flags)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message
    return message


def test_example_loads_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_LB_POLICY", "round_robin")
    settings, fleet = load(write(tmp_path, EXAMPLE))

    assert settings.model == fleet.default_model == "chat"
    assert list(fleet.backends) == ["local", "openai"]
    local, openai = fleet.backends["local"], fleet.backends["openai"]
    assert local.provider is ProviderType.VLLM and openai.provider is ProviderType.OPENAI
    assert local.urls == ("http://vllm-0:8000/v1", "http://vllm-1:8000/v1")
    assert openai.urls == ("https://api.openai.com/v1",)
    assert local.api_key.get_secret_value() == "vllm-key" and openai.api_key.get_secret_value() == SECRET
    assert (local.lb_policy, local.max_concurrent_tasks, local.timeout) == (LBPolicy.PREFIX_AFFINITY, 400, 120.0)
    assert (local.rate_limit_rps, local.rate_limit_burst, local.models) == (0.0, 0, None)
    # What a backend leaves out comes from the settings.
    assert (openai.lb_policy, openai.max_concurrent_tasks, openai.timeout) == (LBPolicy.ROUND_ROBIN, 500, 60.0)
    assert openai.models == ("gpt-4o", "gpt-4o-mini", "o*")

    chat, gpt = fleet.models["chat"], fleet.models["gpt-4o"]
    assert chat.target == Target("local", "meta-llama/Llama-3.1-8B-Instruct")
    assert chat.fallbacks == (Target("openai", "gpt-4o-mini"),)
    assert gpt.target == Target("openai", "gpt-4o")
    assert gpt.fallbacks == (Target("local", "meta-llama/Llama-3.1-8B-Instruct"),)
    assert SECRET not in repr(fleet)


def test_environment_overrides_file_and_flags_override_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "queue_size: 50\nlog_level: debug\nport: 9000\ncors_origins: [https://a, https://b]\n")
    settings, _ = load(path)
    assert (settings.queue_size, settings.log_level, settings.port) == (50, "debug", 9000)
    assert settings.cors_origins == "https://a,https://b"

    monkeypatch.setenv("INFERENCE_QUEUE_SIZE", "70")
    monkeypatch.setenv("inference_port", "9001")  # pydantic-settings reads names in any case
    settings, _ = load(path)
    assert (settings.queue_size, settings.log_level, settings.port) == (70, "debug", 9001)

    settings, _ = load(path, queue_size="90")
    assert settings.queue_size == 90


def test_file_value_under_a_set_variable_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PORT", "8081")
    settings, _ = load(write(tmp_path, "port: not-a-port\n"))
    assert settings.port == 8081


def test_default_model_is_the_model_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(write(tmp_path, "default_model: chat\n"))[0].model == "chat"
    assert load(write(tmp_path, "model: chat\n"))[0].model == "chat"
    monkeypatch.setenv("INFERENCE_MODEL", "from-env")
    settings, fleet = load(write(tmp_path, "default_model: chat\n"))
    assert settings.model == fleet.default_model == "from-env"


def test_file_named_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_CONFIG", str(write(tmp_path, EXAMPLE)))
    settings = load_settings()
    assert settings.config == tmp_path / "inference.yaml" and settings.model == "chat"
    assert list(load_fleet(settings).backends) == ["local", "openai"]


def test_empty_variable_means_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_CONFIG", "")
    assert load_settings().config is None


def test_variables_are_expanded_in_every_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_HOST", "vllm-0")
    monkeypatch.setenv("VLLM_PORT", "8000")
    monkeypatch.setenv("KEYS", "k1,k2")
    monkeypatch.setenv("QUEUE", "42")
    text = (
        "gateway_api_keys: ${KEYS}\n"
        "queue_size: ${QUEUE}\n"
        "backends:\n"
        "  local: {base_url: ['http://${VLLM_HOST}:${VLLM_PORT}/v1/'], max_concurrent_tasks: '${QUEUE}'}\n"
    )
    settings, fleet = load(write(tmp_path, text))
    assert settings.gateway_api_keys is not None and settings.gateway_api_keys.get_secret_value() == "k1,k2"
    assert settings.queue_size == 42
    assert fleet.backends["local"].urls == ("http://vllm-0:8000/v1",)
    assert fleet.backends["local"].max_concurrent_tasks == 42


def test_unset_variable_names_the_key_and_the_variable_only(tmp_path: Path) -> None:
    text = EXAMPLE.replace("${OPENAI_API_KEY}", "${OPENAI_API_KEY}${MISSING_SUFFIX}")
    path = write(tmp_path, text)
    assert problem(path) == (
        f"INFERENCE_CONFIG {path}: backends.openai.api_key: the variable MISSING_SUFFIX is not set"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backends: [\n  local\n  x: y\n", "line 3: not valid YAML"),
        ("- a\n- b\n", "expected a mapping of settings, backends and models, found a list"),
        ("", "found an empty file"),
        ("quue_size: 5\n", "quue_size: unknown key (did you mean queue_size?)"),
        ("queue_size: -1\n", "queue_size: Input should be greater than or equal to 0"),
        ("default_model: a\nmodel: b\n", "default_model: given twice, also as model"),
        ("default_model: 2024-02-30\n", "a value does not fit its type"),
        ("gateway_api_keys: {a: sk-do-not-print}\n", "gateway_api_keys: Input should be a valid string"),
        (EXAMPLE + "base_url: http://x/v1\n", "base_url: give it under backends.<name>, not at the top"),
        ("backends: {}\n", "backends: Dictionary should have at least 1 item"),
        (
            "backends:\n  a: {base_url: http://a/v1}\n  a: {base_url: http://b/v1}\n",
            "line 3: not valid YAML: key 'a' given twice",
        ),
        ("backends: {bad name: {base_url: http://a/v1}}\n", "backends.bad name: a name is 1-64 letters"),
        ("backends: {a: {base_url: [http://a/v1, 'ftp://b']}}\n", "backends.a.base_url[1]: not an http:// or https://"),
        (
            "backends: {a: {base_url: http://a/v1, weight: 2}}\n",
            f"backends.a.weight: unknown key (accepts {', '.join(BackendConfig.model_fields)})",
        ),
        (
            "backends: {local: {base_url: http://a/v1, lb_polcy: round_robin}}\n",
            "backends.local.lb_polcy: unknown key (did you mean lb_policy?)",
        ),
        ("keys: {team-a: {key: k, rmp: 5}}\n", "keys.team-a.rmp: unknown key (did you mean rpm?)"),
        (
            "models: {x: {target: default/m, fallbacs: [default/n]}}\n",
            "models.x.fallbacs: unknown key (did you mean fallbacks?)",
        ),
        ("backends: {a: {base_url: http://a/v1, provider: tgi}}\n", "backends.a.provider: Input should be 'vllm'"),
        ("backends: {a: {base_url: http://a/v1, max_concurrent_tasks: 0}}\n", "backends.a.max_concurrent_tasks: "),
        ("backends: {a: {base_url: http://a/v1, api_key: [sk-do-not-print]}}\n", "backends.a.api_key: Input should"),
        ("backends: {a: {base_url: http://a/v1, models: []}}\n", "backends.a.models: Tuple should have at least 1"),
        (
            EXAMPLE.replace("target: openai/gpt-4o\n", "target: gpt-4o\n"),
            "models.gpt-4o.target: expected backend/model",
        ),
        (
            EXAMPLE.replace("target: openai/gpt-4o\n", "target: azure/gpt-4o\n"),
            "models.gpt-4o.target: no backend named 'azure' (backends: local, openai)",
        ),
        (
            EXAMPLE.replace("[openai/gpt-4o-mini]", "[openai/gpt-4o-mini, azure/gpt-4o]"),
            "models.chat.fallbacks[1]: no backend named 'azure'",
        ),
        ("models: {chat: {target: local/llama}}\n", "models.chat.target: no backend named 'local' (backends: default)"),
        (
            "backends: {a: {base_url: [{url: http://a/v1, kv_events: 'a:5557'}]}}\n",
            "backends.a.base_url[0].kv_events: not a ZMQ endpoint such as tcp://vllm-0:5557",
        ),
        (
            "backends: {a: {base_url: [{url: http://a/v1, kv_replay: 'tcp://a:5558'}]}}\n",
            "backends.a.base_url[0]: kv_replay without kv_events",
        ),
        ("backends: {a: {base_url: [{url: ftp://a}]}}\n", "backends.a.base_url[0].url: not an http://"),
        ("backends: {a: {base_url: [{url: http://a/v1, kv_event: x}]}}\n", "did you mean kv_events?"),
    ],
)
def test_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = problem(path)
    assert message.startswith(f"INFERENCE_CONFIG {path}: ") and expected in message


def test_every_mistyped_key_is_named_in_the_one_line(tmp_path: Path) -> None:
    text = """\
backends:
  local: {base_url: http://a/v1, timout: 5}
  remote: {base_url: http://b/v1, provder: openai}
keys:
  team-a: {key: sk-do-not-print, max_concurent: 2}
"""
    path = write(tmp_path, text)
    assert problem(path) == (
        f"INFERENCE_CONFIG {path}: backends.local.timout: unknown key (did you mean timeout?); "
        "backends.remote.provder: unknown key (did you mean provider?); "
        "keys.team-a.max_concurent: unknown key (did you mean max_concurrent?)"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problem(path) == f"INFERENCE_CONFIG {path}: cannot read (No such file or directory)"


def test_bad_variable_and_bad_file_value_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PORT", "abc")
    path = write(tmp_path, "queue_size: -1\n")
    message = problem(path)
    assert message.startswith("INFERENCE_PORT: ")
    assert f"; INFERENCE_CONFIG {path}: queue_size: Input should be greater than or equal to 0" in message


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = """\
backends:
  a: &shared {base_url: http://a/v1, timeout: 30}
  b:
    <<: *shared
    base_url: http://b/v1
"""
    _, fleet = load(write(tmp_path, text))
    assert fleet.backends["b"].urls == ("http://b/v1",) and fleet.backends["b"].timeout == 30


def test_no_file_is_one_default_backend_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_BASE_URL", "http://a:8000/v1/,http://b:8000/v1")
    monkeypatch.setenv("INFERENCE_PROVIDER_TYPE", "openai")
    monkeypatch.setenv("INFERENCE_API_KEY", SECRET)
    monkeypatch.setenv("INFERENCE_LB_POLICY", "load_aware")
    monkeypatch.setenv("INFERENCE_RATE_LIMIT_RPS", "5")
    monkeypatch.setenv("INFERENCE_MODEL", "llama")
    settings = load_settings()
    fleet = load_fleet(settings)
    assert fleet.models == {} and fleet.default_model == "llama"
    assert fleet.backends == {
        "default": BackendConfig(
            provider=ProviderType.OPENAI,
            base_url=("http://a:8000/v1", "http://b:8000/v1"),
            api_key=settings.api_key,
            lb_policy=LBPolicy.LOAD_AWARE,
            max_concurrent_tasks=500,
            rate_limit_rps=5.0,
            rate_limit_burst=0,
            timeout=60.0,
        )
    }


def test_file_without_backends_routes_aliases_to_the_default_backend(tmp_path: Path) -> None:
    text = "base_url: [http://a/v1, http://b/v1]\nmodels: {chat: {target: default/meta-llama/Llama-3.1-8B}}\n"
    settings, fleet = load(write(tmp_path, text))
    assert list(fleet.backends) == ["default"]
    assert fleet.backends["default"].urls == settings.upstream_roots == ("http://a/v1", "http://b/v1")
    assert fleet.models["chat"].target == Target("default", "meta-llama/Llama-3.1-8B")


def test_fleet_is_read_again_on_every_load(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    settings, _ = load(path)
    path.write_text(EXAMPLE.replace("  gpt-4o:\n", "  gpt-4o-latest:\n"))
    assert list(load_fleet(settings).models) == ["chat", "gpt-4o-latest"]
    path.write_text("backends: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_fleet(settings)
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        load_fleet(settings)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.upper().startswith("INFERENCE_")}
    return subprocess.run(
        [str(Path(sys.executable).parent / "inference-core"), *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_stops_on_a_bad_file_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.replace("${OPENAI_API_KEY}", "${NOT_SET_ANYWHERE}"))
    for result in (_cli("--config", str(path)), _cli(INFERENCE_CONFIG=str(path))):
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines == [f"inference-core: INFERENCE_CONFIG {path}: backends.openai.api_key: "
                         "the variable NOT_SET_ANYWHERE is not set"]  # fmt: skip


def test_cli_reads_a_good_file(tmp_path: Path) -> None:
    """The file is read without complaint; the bad flag after it stops start-up before any server."""
    path = write(tmp_path, EXAMPLE)
    result = _cli("--config", str(path), "--port", "abc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "inference-core: INFERENCE_PORT: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_replicas_with_their_kv_event_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """\
backends:
  llama:
    lb_policy: cache_aware
    tokenizer: /models/llama
    base_url:
      - {url: http://vllm-0:8000/v1/, kv_events: tcp://vllm-0:5557, kv_replay: tcp://vllm-0:5558}
      - http://vllm-1:8000/v1
"""
    _, fleet = load(write(tmp_path, text))
    llama = fleet.backends["llama"]
    assert llama.lb_policy is LBPolicy.CACHE_AWARE and llama.tokenizer == Path("/models/llama")
    assert llama.urls == ("http://vllm-0:8000/v1", "http://vllm-1:8000/v1")
    assert [(r.kv_events, r.kv_replay) for r in llama.base_url] == [
        ("tcp://vllm-0:5557", "tcp://vllm-0:5558"),
        (None, None),
    ]
    # Without a file: the variables, in INFERENCE_BASE_URL's order, an empty entry for a replica without.
    monkeypatch.setenv("INFERENCE_BASE_URL", "http://a/v1,http://b/v1,http://c/v1")
    monkeypatch.setenv("INFERENCE_KV_EVENTS", "tcp://a:5557,,ipc:///run/c/kv")
    monkeypatch.setenv("INFERENCE_KV_REPLAY", "tcp://a:5558")
    default = load_fleet(load_settings()).backends["default"]
    assert [(r.url, r.kv_events, r.kv_replay) for r in default.base_url] == [
        ("http://a/v1", "tcp://a:5557", "tcp://a:5558"),
        ("http://b/v1", None, None),
        ("http://c/v1", "ipc:///run/c/kv", None),
    ]
    monkeypatch.setenv("INFERENCE_KV_EVENTS", "tcp://a:5557,tcp://b:5557,tcp://c:5557,tcp://d:5557")
    with pytest.raises(ConfigError, match="INFERENCE_KV_EVENTS: 4 entries for 3 INFERENCE_BASE_URL replicas"):
        load_fleet(load_settings())
    monkeypatch.setenv("INFERENCE_KV_EVENTS", "tcp://a:5557,vllm-b:5557")
    with pytest.raises(ConfigError, match="'vllm-b:5557' is not a ZMQ endpoint"):
        load_settings()


def test_a_tokenizer_that_does_not_load_stops_start_up_with_one_line(tmp_path: Path) -> None:
    text = f"backends: {{a: {{lb_policy: cache_aware, tokenizer: {tmp_path}, base_url: http://a/v1}}}}\n"
    result = _cli("--config", str(write(tmp_path, text)))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("inference-core: backends.a.tokenizer: ") and "tokenizer.json" in line
