"""Start-up configuration: defaults, one-line errors for bad values, flags over the environment."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from inference_core.config import Settings, warn_unknown_variables
from tests.conftest import MODEL, chat_body
from tests.servers import Server, free_port, start

BRIEF_DEFAULTS = {
    "INFERENCE_PROVIDER_TYPE": "vllm",
    "INFERENCE_BASE_URL": "http://localhost:8000/v1",
    "INFERENCE_API_KEY": "EMPTY",
    "INFERENCE_MODEL": "default-model",
    "INFERENCE_TIMEOUT": 60.0,
    "INFERENCE_MAX_RETRIES": 3,
    "INFERENCE_MAX_CONNECTIONS": 100,
    "INFERENCE_MAX_CONCURRENT_TASKS": 500,
    "INFERENCE_QUEUE_SIZE": 10000,
    "INFERENCE_HOST": "0.0.0.0",
    "INFERENCE_PORT": 8080,
}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    return subprocess.run(
        [sys.executable, "-m", "inference_core", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_brief_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BRIEF_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    for name, expected in BRIEF_DEFAULTS.items():
        value = getattr(settings, name.removeprefix("INFERENCE_").lower())
        value = value.get_secret_value() if name == "INFERENCE_API_KEY" else value
        assert str(value).rstrip("/") == str(expected), name


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("INFERENCE_PORT", "abc", "INFERENCE_PORT"),
        ("INFERENCE_PROVIDER_TYPE", "foo", "'vllm' or 'openai'"),
        ("INFERENCE_BASE_URL", "not a url", "http:// or https:// URL"),
        ("INFERENCE_TIMEOUT", "-1", "greater than 0"),
        ("INFERENCE_DATABASE_URL", "mysql://app:sk-do-not-print@db/app", "not a postgresql:// URL"),
    ],
)
def test_bad_value_stops_startup_with_one_line(variable: str, value: str, expected: str) -> None:
    result = _run(**{variable: value, "INFERENCE_API_KEY": "sk-do-not-print"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and expected in lines[0]
    assert "Traceback" not in result.stderr and "sk-do-not-print" not in result.stderr + result.stdout


def test_bad_value_under_plain_uvicorn() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "inference_core.api:app", "--port", str(free_port())],
        env=clean | {"INFERENCE_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "INFERENCE_PORT" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_setting() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout
        assert f"INFERENCE_{name.upper()}" in result.stdout


def test_flags_override_environment(simulator: Server, log_dir: Path) -> None:
    port = free_port()
    env = {"INFERENCE_PORT": str(free_port()), "INFERENCE_BASE_URL": "http://127.0.0.1:1/v1"}
    flags = ["--port", str(port), "--host", "127.0.0.1", "--base-url", simulator.url + "/v1", "--model", MODEL]
    server = start(["inference_core", *flags], port=port, env=env, log_dir=log_dir, ready_path="/health/live")
    try:
        assert httpx.post(server.url + "/v1/chat/completions", json=chat_body()).status_code == 200
    finally:
        server.stop()


def test_uvicorn_entry_point(simulator: Server, log_dir: Path) -> None:
    port = free_port()
    env = {"INFERENCE_BASE_URL": simulator.url + "/v1", "INFERENCE_MODEL": MODEL}
    command = ["uvicorn", "inference_core.api:app", "--port", str(port)]
    server = start(command, port=port, env=env, log_dir=log_dir, ready_path="/health/live")
    try:
        assert httpx.post(server.url + "/v1/chat/completions", json=chat_body()).status_code == 200
    finally:
        server.stop()


def test_unknown_variables_are_named_with_the_nearest_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in os.environ:
        if name.upper().startswith("INFERENCE_"):
            monkeypatch.delenv(name)
    for name in ("INFERENCE_MODLE", "INFERENCE_FOO", "inference_max_retry", "INFERENCE_MODEL", "INFERENCE_VLLM_VENV"):
        monkeypatch.setenv(name, "sk-do-not-print")
    with caplog.at_level(logging.WARNING, logger="inference_core.config"):
        warn_unknown_variables()
    assert {(r.name, r.levelname) for r in caplog.records} == {("inference_core.config", "WARNING")}
    assert [r.getMessage() for r in caplog.records] == [
        "INFERENCE_FOO is not a setting",
        "INFERENCE_MODLE is not a setting; did you mean INFERENCE_MODEL?",
        "inference_max_retry is not a setting; did you mean INFERENCE_MAX_RETRIES?",
    ]
    assert "sk-do-not-print" not in caplog.text


@pytest.mark.parametrize("command", [["inference_core"], ["uvicorn", "inference_core.api:app"]], ids=["cli", "uvicorn"])
def test_unknown_variable_is_one_warning_in_the_log(command: list[str], simulator: Server, log_dir: Path) -> None:
    port = free_port()
    env = {
        "INFERENCE_BASE_URL": simulator.url + "/v1",
        "INFERENCE_MODEL": MODEL,
        "INFERENCE_HOST": "127.0.0.1",
        "INFERENCE_PORT": str(port),
        "INFERENCE_MODLE": "sk-do-not-print",
    }
    server = start([*command, "--port", str(port)], port=port, env=env, log_dir=log_dir, ready_path="/health/live")
    server.stop()  # every line is written once the process has exited
    logged = [json.loads(line) for line in server.output.splitlines() if "INFERENCE_MODLE" in line]
    assert [(line["level"], line["logger"], line["message"]) for line in logged] == [
        ("warning", "inference_core.config", "INFERENCE_MODLE is not a setting; did you mean INFERENCE_MODEL?")
    ]
    assert "sk-do-not-print" not in server.output
