"""Several backends behind one gateway, from a configuration file: routing, aliases, fallbacks, reload.

Three simulators: ``local`` (vLLM, a chat model and a LoRA adapter), ``coder`` (vLLM, another
model) and ``openai`` (OpenAI's dialect, models declared by glob). Tests that need a broken or
slow backend start their own simulator and gateway.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import FAST_RETRIES, LORA, MODEL, Configured, chat_body, sim_stats
from tests.servers import Server, held, metric, start_fleet, start_simulator, until

CODER = "coder-7b"
OPENAI_KEY = "sk-openai-fleet-secret-77c1"


def fleet_yaml(chat_sim: Server, coder_sim: Server, openai_sim: Server, **blocks: str) -> str:
    """The suite's standard file; ``blocks`` replace a backend's block (e.g. ``openai=...``)."""
    backends = {
        "local": f"provider: vllm\n    base_url: {chat_sim.url}/v1",
        "coder": f"provider: vllm\n    base_url: [{coder_sim.url}/v1]",
        "openai": f"provider: openai\n    base_url: {openai_sim.url}/v1\n    api_key: ${{FLEET_OPENAI_KEY}}\n"
        '    models: [gpt-4o, "gpt-4o-*"]',
    } | blocks
    lines = ["backends:"] + [f"  {name}:\n    {block}" for name, block in backends.items()]
    return (
        "\n".join(lines)
        + f"""
models:
  chat:
    target: local/{MODEL}
    fallbacks: [openai/gpt-4o]
  gpt-4o-large:
    target: openai/gpt-4o
    fallbacks: [local/{MODEL}]
default_model: chat
"""
    )


@pytest.fixture(scope="module")
def sims(log_dir: Path) -> Iterator[tuple[Server, Server, Server]]:
    servers = (
        start_simulator(log_dir, "--lora", LORA),
        start_simulator(log_dir, "--model", CODER),
        start_simulator(log_dir, "--mode", "openai", "--model", "gpt-4o"),
    )
    yield servers
    for server in servers:
        server.stop()


Fleet = Callable[..., Server]


@pytest.fixture
def fleet(configured: Configured) -> Fleet:
    """Start a gateway from a file's text, with the OpenAI backend's key in the environment."""
    return lambda text, **settings: configured(text, {"FLEET_OPENAI_KEY": OPENAI_KEY}, **settings)


@pytest.fixture(scope="module")
def gateway3(
    log_dir: Path, sims: tuple[Server, Server, Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("fleet") / "gateway.yaml"
    path.write_text(fleet_yaml(*sims))
    server = start_fleet(log_dir, path, env={"FLEET_OPENAI_KEY": OPENAI_KEY}, **FAST_RETRIES)
    yield server
    server.stop()


def chat(server: Server, **body: Any) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=30)


def served_by(response: httpx.Response) -> tuple[int, str, str]:
    return (
        response.status_code,
        response.headers.get("x-inference-backend", ""),
        response.headers.get("x-inference-fallbacks", ""),
    )


def test_each_model_goes_to_the_backend_that_serves_it(gateway3: Server, sims: tuple[Server, ...]) -> None:
    _, coder, remote = sims
    assert served_by(chat(gateway3, model=MODEL)) == (200, "local", "0")
    assert served_by(chat(gateway3, model=LORA)) == (200, "local", "0")
    assert served_by(chat(gateway3, model=CODER)) == (200, "coder", "0")
    assert sim_stats(coder)["last_body"]["model"] == CODER
    assert served_by(chat(gateway3, model="gpt-4o")) == (200, "openai", "0")
    sent_key = sim_stats(remote)["last_headers"]["authorization_sha256"]
    assert sent_key == hashlib.sha256(f"Bearer {OPENAI_KEY}".encode()).hexdigest()
    unknown = chat(gateway3, model="no-such-model")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_an_alias_reaches_its_target_under_the_target_s_name(gateway3: Server, sims: tuple[Server, ...]) -> None:
    local = sims[0]
    response = chat(gateway3, model="chat")
    assert served_by(response) == (200, "local", "0")
    assert sim_stats(local)["last_body"]["model"] == MODEL
    assert served_by(chat(gateway3)) == (200, "local", "0")  # no model: default_model, itself an alias
    assert sim_stats(local)["last_body"]["model"] == MODEL


def test_models_are_the_union_of_backends_and_aliases(gateway3: Server) -> None:
    with openai.OpenAI(base_url=gateway3.url + "/v1", api_key="unused") as sdk:
        ids = [model.id for model in sdk.models.list()]
        assert sorted(ids) == sorted([MODEL, LORA, CODER, "gpt-4o", "chat", "gpt-4o-large"])
        assert sdk.models.retrieve("gpt-4o-large").id == "gpt-4o-large"


def test_health_lists_every_backend_with_its_replicas(gateway3: Server) -> None:
    health = httpx.get(gateway3.url + "/health").json()
    assert health["status"] == "ok"
    assert [b["name"] for b in health["backends"]] == ["local", "coder", "openai"]
    assert [b["provider"] for b in health["backends"]] == ["vllm", "vllm", "openai"]
    assert all(b["healthy_replicas"] == 1 and len(b["replicas"]) == 1 for b in health["backends"])
    assert health["aliases"]["chat"] == [f"local/{MODEL}", "openai/gpt-4o"]
    assert OPENAI_KEY not in httpx.get(gateway3.url + "/health").text


def test_upstream_metrics_carry_the_backend(gateway3: Server) -> None:
    chat(gateway3, model=CODER)
    text = httpx.get(gateway3.url + "/metrics").text
    assert 'inference_core_backend_up{backend="coder"} 1.0' in text
    assert 'inference_core_replica_requests_total{backend="coder",replica="r0"}' in text
    assert re.search(
        r'inference_core_upstream_duration_seconds_count\{backend="coder",endpoint="/v1/chat/completions"\} [1-9]', text
    )


def test_vllm_only_endpoints_skip_targets_that_cannot_serve_them(gateway3: Server) -> None:
    """``gpt-4o-large`` is OpenAI first: Anthropic's API and /tokenize go to its vLLM fallback."""
    with anthropic.Anthropic(base_url=gateway3.url, api_key="unused", max_retries=0) as sdk:
        raw = sdk.messages.with_raw_response.create(
            model="gpt-4o-large", max_tokens=4, messages=[{"role": "user", "content": "Hello!"}]
        )
    assert raw.headers["x-inference-backend"] == "local" and raw.headers["x-inference-fallbacks"] == "1"
    assert raw.parse().type == "message"
    tokens = httpx.post(gateway3.url + "/tokenize", json={"model": "gpt-4o-large", "prompt": "hi"})
    assert served_by(tokens) == (200, "local", "1")
    refused = httpx.post(gateway3.url + "/tokenize", json={"model": "gpt-4o", "prompt": "hi"})
    assert refused.status_code == 400 and "/tokenize" in refused.json()["error"]["message"]


def test_responses_and_audio_are_routed_by_model(gateway3: Server, sims: tuple[Server, ...]) -> None:
    with openai.OpenAI(base_url=gateway3.url + "/v1", api_key="unused", max_retries=0) as sdk:
        first = sdk.responses.create(model="chat", input="Hello!")
        follow = sdk.responses.with_raw_response.create(model="chat", input="More", previous_response_id=first.id)
        assert follow.headers["x-inference-backend"] == "local"
        assert sdk.responses.retrieve(first.id).id == first.id
        audio = b"RIFF" + bytes(4000)
        text = sdk.audio.transcriptions.with_raw_response.create(model="chat", file=("a.wav", audio))
        assert text.headers["x-inference-backend"] == "local"
        assert "4004 bytes" in text.parse().text
        assert sim_stats(sims[0])["last_body"]["model"] == MODEL  # the alias rewritten inside the form
    form = {"model": CODER, "stream": "true"}
    with httpx.stream("POST", gateway3.url + "/v1/audio/transcriptions", data=form, files={"file": audio}) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers["x-inference-backend"] == "coder"
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"transcription.chunk"' in events[0]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("status=503", "503"), ("status=429", "429"), ("status=500", "500"), ("status=408", "408")],
)
def test_a_failing_target_falls_back_with_the_right_translation(
    fleet: Fleet, log_dir: Path, sims: tuple[Server, ...], fault: str, reason: str
) -> None:
    broken = start_simulator(log_dir, "--fault", fault)
    try:
        gateway = fleet(fleet_yaml(broken, sims[1], sims[2]), max_retries="1")
        guided = {"type": "object", "properties": {"answer": {"type": "string"}}}
        response = chat(gateway, model="chat", guided_json=guided, top_k=5)
        assert served_by(response) == (200, "openai", "1")
        body = sim_stats(sims[2])["last_body"]
        assert body["model"] == "gpt-4o" and "guided_json" not in body and "top_k" not in body
        assert body["response_format"]["json_schema"]["schema"] == guided
        assert response.headers["x-inference-dropped-params"] == "top_k"
        metrics = httpx.get(gateway.url + "/metrics").text
        assert f'inference_core_fallbacks_total{{from="local",reason="{reason}",to="openai"}} 1.0' in metrics
        assert sim_stats(broken)["requests"]["/v1/chat/completions"] == 2  # one retry, then the fallback
    finally:
        broken.stop()


def test_no_fallback_on_a_client_error(fleet: Fleet, log_dir: Path, sims: tuple[Server, ...]) -> None:
    broken = start_simulator(log_dir, "--fault", "status=400")
    try:
        gateway = fleet(fleet_yaml(broken, sims[1], sims[2]))
        response = chat(gateway, model="chat")
        assert served_by(response) == (400, "local", "0")
        assert "inference_core_fallbacks_total{" not in httpx.get(gateway.url + "/metrics").text
    finally:
        broken.stop()


def test_an_unreachable_target_and_a_stream_fall_back_before_the_first_byte(
    fleet: Fleet, sims: tuple[Server, ...]
) -> None:
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    gateway = fleet(fleet_yaml(sims[0], sims[1], sims[2], local=f"provider: vllm\n    base_url: {dead}"))
    response = chat(gateway, model="chat")
    assert served_by(response) == (200, "openai", "1")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as sdk:
        stream = sdk.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
        assert stream.headers["x-inference-backend"] == "openai"
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert re.search(
        r'inference_core_fallbacks_total\{from="local",reason="(no_replica|connect)",to="openai"\} 2.0', metrics
    )


def test_a_full_backend_falls_back_and_a_slow_one_does_not_hold_up_another(
    fleet: Fleet, log_dir: Path, sims: tuple[Server, ...]
) -> None:
    """``local`` has one slot, taken by a slow request: ``chat`` waits past queue_timeout, then
    moves to ``openai``; requests for ``coder`` meanwhile never wait for a slot."""
    slow = start_simulator(log_dir)
    try:
        block = f"provider: vllm\n    base_url: {slow.url}/v1\n    max_concurrent_tasks: 1"
        gateway = fleet(fleet_yaml(slow, sims[1], sims[2], local=block), queue_timeout="0.5")
        # A stream the backend would take a minute to start: it holds local's slot until closed.
        occupier = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        with held(gateway, "/v1/chat/completions", {**occupier, "sim_fault": "ttft=60"}):
            until(
                lambda: metric(gateway, "inference_core_backend_in_flight", backend="local") == 1,
                "the slow request never took local's slot",
            )
            coder = [chat(gateway, model=CODER) for _ in range(5)]
            assert all(served_by(r) == (200, "coder", "0") for r in coder)
            assert max(float(r.headers["x-inference-queue-ms"]) for r in coder) < 50
            moved = chat(gateway, model="chat")
            assert served_by(moved) == (200, "openai", "1")
            assert float(moved.headers["x-inference-queue-ms"]) >= 400  # it waited for local's slot first
    finally:
        slow.stop()


def test_sighup_reloads_during_traffic_without_a_failed_request(
    fleet: Fleet, sims: tuple[Server, ...], tmp_path: Path
) -> None:
    gateway = fleet(fleet_yaml(*sims))
    path = tmp_path / "gateway-0.yaml"
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            while not stop.is_set():
                statuses.append(http.post("/v1/chat/completions", json=chat_body(model="chat")).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        until(lambda: len(statuses) > 5, "no traffic before the reload")
        # The alias now goes to the coder backend; a new backend appears, an old one goes.
        changed = fleet_yaml(*sims).replace("  local:\n", "  again:\n").replace(f"local/{MODEL}", f"again/{MODEL}")
        changed = changed.replace(f"target: again/{MODEL}", f"target: coder/{CODER}")
        path.write_text(changed)
        os.kill(gateway.process.pid, signal.SIGHUP)
        until(lambda: chat(gateway, model="chat").headers.get("x-inference-backend") == "coder", "not reloaded")
        reloaded = len(statuses)
        until(lambda: len(statuses) > reloaded + 5, "no traffic after the reload")
        path.write_text("backends: [this is not a mapping")
        os.kill(gateway.process.pid, signal.SIGHUP)
        until(lambda: "configuration not reloaded" in gateway.output, "the bad file was never read")
        refused = len(statuses)
        until(lambda: len(statuses) > max(refused + 5, 20), "no traffic after the refused reload")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert len(statuses) > 20 and set(statuses) == {200}
    assert served_by(chat(gateway, model="chat")) == (200, "coder", "0")  # the bad file changed nothing
    health = httpx.get(gateway.url + "/health").json()
    assert [b["name"] for b in health["backends"]] == ["again", "coder", "openai"]
    gateway.stop()
    assert "configuration reloaded" in gateway.output
    assert re.search(r"configuration not reloaded.*INFERENCE_CONFIG", gateway.output)
