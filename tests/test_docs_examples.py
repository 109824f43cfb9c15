"""The examples in README.md and docs/*.md, found by their markers and run as written.

A line ``<!-- example: NAME -->`` directly before a fenced block marks that block as the example
NAME; names are unique across the pages. Each test here that runs examples is registered with
``@runs("NAME", ...)``, and a test fails when a marked block has no test or a test no block, so
an example cannot be added, renamed or dropped without the tests noticing. Addresses in the
examples (``localhost:8080``, the ports of the configuration file's worked example) are the only
things changed: the tests' servers listen on free ports.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import yaml

from inference_core.config import load_settings
from inference_core.config_file import load_fleet
from tests.conftest import FAST_RETRIES, MODEL
from tests.servers import Server, start_fleet

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<name>\S+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<language>[\w-]*)\s*$")
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
SAMPLE_BATCH = ROOT / "examples" / "requests.jsonl"


@dataclass(frozen=True)
class Example:
    """One marked fenced block: its name, language, text (unindented) and where it is."""

    name: str
    language: str
    code: str
    where: str


def parse(page: str, text: str) -> tuple[list[Example], list[str]]:
    """The marked blocks of one page, and what is wrong with its markers."""
    lines = text.splitlines()
    examples: list[Example] = []
    problems: list[str] = []
    for number, line in enumerate(lines):
        marker = MARKER.match(line)
        if marker is None:
            continue
        name, where = marker["name"], f"{page}:{number + 1}"
        opening = FENCE.match(lines[number + 1]) if number + 1 < len(lines) else None
        if opening is None:
            problems.append(f"{where}: the marker {name!r} is not directly followed by a fenced block")
            continue
        end = next((i for i in range(number + 2, len(lines)) if lines[i].strip() == opening["fence"]), None)
        if end is None:
            problems.append(f"{where}: the block marked {name!r} is never closed")
            continue
        code = "".join(body.removeprefix(opening["indent"]) + "\n" for body in lines[number + 2 : end])
        examples.append(Example(name, opening["language"], code, where))
    return examples, problems


def collect(pages: dict[str, str]) -> tuple[dict[str, Example], list[str]]:
    """Every page's marked blocks by name, and every problem: a marker without a block, a name used twice."""
    found: dict[str, Example] = {}
    problems: list[str] = []
    for page, text in pages.items():
        examples, wrong = parse(page, text)
        problems += wrong
        for block in examples:
            if block.name in found:
                problems.append(f"{block.where}: the name {block.name!r} is taken by {found[block.name].where}")
            else:
                found[block.name] = block
    return found, problems


PAGES = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]
}
EXAMPLES, PROBLEMS = collect(PAGES)

#: Which test runs which example, filled in by ``@runs``.
RUN_BY: dict[str, str] = {}
Test = TypeVar("Test", bound=Callable[..., None])


def runs(*names: str) -> Callable[[Test], Test]:
    def register(test: Test) -> Test:
        for name in names:
            RUN_BY[name] = test.__name__
        return test

    return register


def example(name: str, language: str) -> str:
    found = EXAMPLES.get(name)
    assert found is not None, f"no block is marked <!-- example: {name} -->"
    assert found.language == language, f"{found.where}: {name!r} is {found.language!r}, not {language!r}"
    return found.code


def at(code: str, server: Server, port: int = 8080) -> str:
    """``code`` with the address ``localhost:PORT`` moved to ``server``'s."""
    address = server.url.removeprefix("http://")
    return code.replace(f"http://localhost:{port}", server.url).replace(f"localhost:{port}", address)


def shell(code: str, *, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with bash, ``inference-core`` being this checkout's (as after ``. .venv/bin/activate``)."""
    prelude = f'inference-core() {{ {shlex.quote(sys.executable)} -m inference_core "$@"; }}\n'
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "OPENAI_"))}
    return subprocess.run(
        ["bash", "-c", prelude + code], cwd=cwd, env=clean | (env or {}), capture_output=True, text=True, timeout=120
    )


# The markers themselves.


def test_every_marker_names_one_fenced_block_and_no_name_is_used_twice() -> None:
    assert PROBLEMS == []


def test_a_marker_without_a_block_and_a_name_used_twice_are_caught() -> None:
    pages = {
        "one.md": "<!-- example: a -->\n```bash\necho a\n```\n\n<!-- example: b -->\nprose, not a block\n",
        "two.md": "text\n\n<!-- example: a -->\n```python\nprint()\n```\n<!-- example: c -->\n```yaml\nx: 1\n",
    }
    found, problems = collect(pages)
    assert list(found) == ["a"] and found["a"].code == "echo a\n" and found["a"].where == "one.md:1"
    assert problems == [
        "one.md:6: the marker 'b' is not directly followed by a fenced block",
        "two.md:7: the block marked 'c' is never closed",
        "two.md:3: the name 'a' is taken by one.md:1",
    ]


def test_an_indented_block_is_read_without_its_indent() -> None:
    found, problems = collect({"list.md": "- item:\n\n  <!-- example: x -->\n  ```bash\n  echo x\n    more\n  ```\n"})
    assert problems == [] and found["x"].code == "echo x\n  more\n"


def test_every_marked_example_is_run_by_a_test() -> None:
    assert sorted(EXAMPLES) == sorted(RUN_BY), "a marked block without a test, or a test without its block"


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_links_between_the_pages_lead_somewhere() -> None:
    broken = []
    for page in [*PAGES, "bench/README.md"]:
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (ROOT / page).parent / path if path else ROOT / page
            if not linked.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page}: {target} (no such heading)")
    assert broken == []


# The README's first commands.


@runs("demo", "test-suite")
def test_the_readme_opens_with_the_demo_and_the_test_command() -> None:
    """The first two blocks are the demo and the test command (tests/test_demo.py runs the demo; CI the command)."""
    first_two = [block.name for block in parse("README.md", PAGES["README.md"])[0][:2]]
    blocks = re.findall(r"^```\w*\n(.*?)^```", PAGES["README.md"], re.S | re.M)
    assert first_two == ["demo", "test-suite"] and blocks[:2] == [EXAMPLES["demo"].code, EXAMPLES["test-suite"].code]
    assert example("demo", "bash").split("#")[0].strip() == "./scripts/demo"
    assert os.access(ROOT / "scripts" / "demo", os.X_OK)
    assert example("test-suite", "bash").strip() == TEST_COMMAND
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text().splitlines()


# Requests to a running gateway.


@runs("sdk-chat", "sdk-streaming")
def test_sdk_examples_print_what_they_promise(gateway: Server) -> None:
    program = at(example("sdk-chat", "python") + example("sdk-streaming", "python"), gateway)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "fruits" in orjson.loads(done.stdout.splitlines()[0])
    assert re.search(r"\n\d+ prompt \+ \d+ completion tokens\n$", done.stdout), done.stdout


@runs("curl-chat")
def test_the_curl_example_gets_a_chat_completion(gateway: Server) -> None:
    done = shell(at(example("curl-chat", "bash"), gateway))
    assert done.returncode == 0, done.stderr
    answer = orjson.loads(done.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]


@runs("curl-streaming")
def test_the_curl_stream_ends_with_done(gateway: Server) -> None:
    done = shell(at(example("curl-streaming", "bash"), gateway))
    assert done.returncode == 0, done.stderr
    events = [line.removeprefix("data: ") for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"} and chunks[0]["model"] == MODEL


@runs("batch-chat-curl")
def test_the_batch_call_answers_each_request_in_order(gateway: Server) -> None:
    done = shell(at(example("batch-chat-curl", "bash"), gateway))
    assert done.returncode == 0, done.stderr
    first, second = orjson.loads(done.stdout)["results"]
    assert first["object"] == "chat.completion" and first["id"].startswith("chatcmpl-")
    assert set(second) == {"error"}


# The configuration file.


@runs("configuration-file")
def test_the_configuration_file_shown_loads_as_described(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "v-key")
    monkeypatch.setenv("OPENAI_API_KEY", "o-key")
    path = tmp_path / "gateway.yaml"
    path.write_text(example("configuration-file", "yaml"))
    settings = load_settings(config=str(path))
    fleet = load_fleet(settings)
    assert list(fleet.backends) == ["local", "openai"] and settings.queue_size == 20000
    assert fleet.backends["local"].urls == ("http://vllm-0:8100/v1", "http://vllm-1:8100/v1")
    assert fleet.models["chat"].target.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert settings.model == "chat"


def _demo_ports(text: str) -> list[str]:
    """The demo's ports (8080, 8000) wherever ``text`` names a local address."""
    return re.findall(r"(?:localhost|127\.0\.0\.1):(8080|8000)\b|--port (8080|8000)\b", text)


@runs("configuration-worked-example")
def test_the_worked_example_routes_as_it_says(spawn: Callable[..., Server], log_dir: Path, tmp_path: Path) -> None:
    """The worked example's commands, with the simulators and the gateway on free ports."""
    commands = example("configuration-worked-example", "bash")
    assert _demo_ports(commands) == [], "the worked example must not take the demo's ports"
    simulators = re.findall(r"^inference-core simulate --port (\d+) (.*) &$", commands, re.M)
    yaml_text = re.search(r"<<'YAML'\n(.*?)YAML\n", commands, re.S)
    gateway_line = re.search(
        r"^OPENAI_API_KEY=\S+ inference-core --config gateway\.yaml --port (\d+) &\n", commands, re.M
    )
    assert len(simulators) == 2 and yaml_text and gateway_line
    started = {port: spawn("simulator", *shlex.split(args)) for port, args in simulators}
    text = yaml_text[1]
    for port, server in started.items():
        text = text.replace(f"http://127.0.0.1:{port}", server.url)
    (tmp_path / "gateway.yaml").write_text(text)
    gateway = start_fleet(log_dir, tmp_path / "gateway.yaml", env={"OPENAI_API_KEY": "sk-example"}, **FAST_RETRIES)
    try:
        requests = at(commands[gateway_line.end() :], gateway, port=int(gateway_line[1]))
        done = shell(requests)
        assert done.returncode == 0, done.stderr
        header, models = done.stdout.split("\n", 1)
        assert header.strip() == "x-inference-backend: local"
        ids = [entry["id"] for entry in orjson.loads(models)["data"]]
        assert sorted(ids) == sorted(["meta-llama/Llama-3.1-8B-Instruct", "gpt-4o-mini", "chat"])
        local, _ = started.values()
        local.stop()
        chat = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}
        moved = httpx.post(gateway.url + "/v1/chat/completions", json=chat)
        assert (moved.headers["x-inference-backend"], moved.headers["x-inference-fallbacks"]) == ("openai", "1")
    finally:
        gateway.stop()


@runs("keys")
def test_the_keys_shown_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_A_KEY", "sk-a")
    path = tmp_path / "keys.yaml"
    path.write_text(example("keys", "yaml"))
    keys = load_fleet(load_settings(config=str(path))).keys
    assert keys["team-a"].rpm == 600 and keys["team-a"].models == ("chat", "gpt-4o*")
    assert keys["ops"].admin and keys["ops"].key_sha256 == hashlib.sha256(b"test").hexdigest()


# Batches.


def _sample_lines() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in SAMPLE_BATCH.read_bytes().splitlines()]


def test_the_sample_batch_input_is_chat_completion_lines() -> None:
    lines = _sample_lines()
    assert 3 <= len(lines) <= 10
    assert len({line["custom_id"] for line in lines}) == len(lines)
    for line in lines:
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert (line["method"], line["url"], line["body"]["model"]) == ("POST", "/v1/chat/completions", MODEL)
        assert line["body"]["messages"][0]["role"] == "user"


@runs("batch-cli")
def test_the_batch_command_runs_the_sample_input(gateway: Server, tmp_path: Path) -> None:
    """The commands as written, from a folder holding ``examples/`` as the repository's root does."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    submit, status = [line for line in example("batch-cli", "bash").splitlines() if not line.startswith("#")]
    env = {"OPENAI_BASE_URL": gateway.url + "/v1"}
    done = shell(submit, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.splitlines()[0]
    assert f"output: results/{batch_id}_output.jsonl" in done.stdout.splitlines()
    output = [
        orjson.loads(line) for line in (tmp_path / "results" / f"{batch_id}_output.jsonl").read_bytes().splitlines()
    ]
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in _sample_lines())
    assert {line["response"]["status_code"] for line in output} == {200}
    errors = tmp_path / "results" / f"{batch_id}_errors.jsonl"
    assert not errors.exists() or errors.read_bytes() == b""
    shown = shell(status.replace("batch_...", batch_id), cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    batch = orjson.loads(shown.stdout)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == len(output)


# Deployment.


@runs("kubernetes-probes")
def test_the_probes_shown_are_the_deployments() -> None:
    shown = yaml.safe_load(example("kubernetes-probes", "yaml"))
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    assert shown["livenessProbe"] == gateway["livenessProbe"] and shown["readinessProbe"] == gateway["readinessProbe"]
    assert shown["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
