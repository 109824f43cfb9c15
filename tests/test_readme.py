"""The README's Python examples, run as written against a gateway (only the address changed)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from inference_core.config import load_settings
from inference_core.config_file import load_fleet
from tests.conftest import FAST_RETRIES
from tests.servers import Server, start_fleet

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _example(after: str) -> str:
    """The first Python block after the line ``after``."""
    found = re.search(re.escape(after) + r".*?```python\n(.*?)```", README, re.S)
    assert found, f"no Python example after {after!r}"
    return found.group(1)


def test_sdk_examples_print_what_they_promise(gateway: Server) -> None:
    program = _example("With the OpenAI SDK") + _example("Streaming, with token usage at the end")
    program = program.replace("http://localhost:8080", gateway.url)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\n\d+ prompt \+ \d+ completion tokens\n$", done.stdout), done.stdout


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README, re.S)


def test_the_configuration_file_shown_loads_as_described(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "v-key")
    monkeypatch.setenv("OPENAI_API_KEY", "o-key")
    path = tmp_path / "gateway.yaml"
    path.write_text(_yaml_blocks()[0])
    settings = load_settings(config=str(path))
    fleet = load_fleet(settings)
    assert list(fleet.backends) == ["local", "openai"] and settings.queue_size == 20000
    assert fleet.backends["local"].base_url == ("http://vllm-0:8000/v1", "http://vllm-1:8000/v1")
    assert fleet.models["chat"].target.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert settings.model == "chat"


def test_the_worked_example_routes_as_it_says(spawn: Callable[..., Server], log_dir: Path, tmp_path: Path) -> None:
    """The worked example's commands, with the simulators and the gateway on free ports."""
    block = re.search(r"A worked example.*?```bash\n(.*?)```", README, re.S)
    assert block
    commands = block.group(1)
    yaml_text = re.search(r"<<'YAML'\n(.*?)YAML\n", commands, re.S)
    assert yaml_text
    local = spawn("simulator", "--model", "meta-llama/Llama-3.1-8B-Instruct")
    remote = spawn("simulator", "--mode", "openai", "--model", "gpt-4o-mini")
    text = yaml_text.group(1).replace("http://127.0.0.1:8000", local.url).replace("http://127.0.0.1:8001", remote.url)
    (tmp_path / "gateway.yaml").write_text(text)
    gateway = start_fleet(log_dir, tmp_path / "gateway.yaml", env={"OPENAI_API_KEY": "sk-example"}, **FAST_RETRIES)
    try:
        chat = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(gateway.url + "/v1/chat/completions", json=chat).headers["x-inference-backend"] == "local"
        models = [entry["id"] for entry in httpx.get(gateway.url + "/v1/models").json()["data"]]
        assert sorted(models) == sorted(["meta-llama/Llama-3.1-8B-Instruct", "gpt-4o-mini", "chat"])
        local.stop()
        moved = httpx.post(gateway.url + "/v1/chat/completions", json=chat)
        assert (moved.headers["x-inference-backend"], moved.headers["x-inference-fallbacks"]) == ("openai", "1")
    finally:
        gateway.stop()


def test_the_keys_shown_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_A_KEY", "sk-a")
    path = tmp_path / "keys.yaml"
    path.write_text(_yaml_blocks()[1])
    keys = load_fleet(load_settings(config=str(path))).keys
    assert keys["team-a"].rpm == 600 and keys["team-a"].models == ("chat", "gpt-4o*")
    assert keys["ops"].admin and keys["ops"].key_sha256 == hashlib.sha256(b"test").hexdigest()
