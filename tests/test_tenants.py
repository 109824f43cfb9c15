"""Keys with names and limits, from the configuration file: auth, models, rpm/tpm, concurrency, priority, share."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL, Configured, sim_stats
from tests.servers import Server, held, metric, start_simulator, until

TEAM_A = "sk-team-a-3c9d51"
TEAM_B = "sk-team-b-77e2a0"
ADMIN = "sk-admin-0b14c2"
FLAT = "sk-flat-5a0e99"
OTHERS = "sk-others-1234ab"


def keys_yaml(simulator: Server, *, window: float = 3600, extra: str = "") -> str:
    """The suite's keys; windows of an hour, so no test's requests straddle two by chance."""
    digest = hashlib.sha256(TEAM_B.encode()).hexdigest()
    return f"""
limit_window: {window}
gateway_api_keys: {FLAT}
backends:
  local: {{base_url: {simulator.url}/v1}}
models:
  chat: {{target: local/{MODEL}}}
default_model: chat
keys:
  team-a:
    key: ${{TEAM_A_KEY}}
    models: [chat, "meta-llama/*"]
    rpm: 4
    priority: 2
  team-b:
    key_sha256: {digest}
    tpm: 300
  others:
    key: {OTHERS}
    models: ["gpt-*"]
  admin:
    key: {ADMIN}
    admin: true
{extra}"""


@pytest.fixture(scope="module")
def simulator(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir)
    yield server
    server.stop()


Start = Callable[..., Server]


@pytest.fixture
def start(configured: Configured) -> Start:
    """Start a gateway from a file's text, with team A's key in the environment."""
    return lambda text, **settings: configured(text, {"TEAM_A_KEY": TEAM_A}, **settings)


def chat(
    server: Server, key: str | None, *, header: str = "authorization", request_id: str | None = None, **body: Any
) -> httpx.Response:
    headers = {} if key is None else {header: f"Bearer {key}" if header == "authorization" else key}
    if request_id is not None:
        headers["x-request-id"] = request_id
    payload = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30)


def scraped(gateway: Server, expected: str) -> str:
    """The metrics once ``expected`` shows: a request is counted just after its answer went out."""

    def shown() -> str | None:
        text = httpx.get(gateway.url + "/metrics").text
        return text if expected in text else None

    return until(shown, f"{expected} never showed")


def usage_of(gateway: Server, key: str) -> dict[str, Any]:
    entry: dict[str, Any] = httpx.get(gateway.url + "/v1/usage", headers={"x-api-key": key}).json()["data"][0]
    return entry


def test_keys_are_checked_and_named(start: Start, simulator: Server) -> None:
    gateway = start(keys_yaml(simulator))
    for key in (None, "sk-wrong", TEAM_A[:-1]):
        refused = chat(gateway, key)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert chat(gateway, TEAM_A).status_code == 200
    assert chat(gateway, TEAM_B, header="x-api-key").status_code == 200  # the file holds only its digest
    assert chat(gateway, FLAT).status_code == 200  # INFERENCE_GATEWAY_API_KEYS keeps working, unlimited
    gateway.stop()
    log = gateway.output
    assert '"key":"team-a"' in log and '"key":"team-b"' in log and '"key":"key-1"' in log
    assert not any(secret in log for secret in (TEAM_A, TEAM_B, FLAT))


def test_a_key_uses_only_its_models(start: Start, simulator: Server) -> None:
    gateway = start(keys_yaml(simulator))
    refused = chat(gateway, OTHERS)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert refused.headers["x-should-retry"] == "false"
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=0) as sdk:
        assert sorted(model.id for model in sdk.models.list()) == sorted([MODEL, "chat"])
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=OTHERS, max_retries=0) as sdk:
        assert list(sdk.models.list()) == []
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("chat")
    scraped(gateway, 'inference_core_key_rejections_total{key="others",reason="model_not_allowed"} 1.0')


def test_rpm_answers_429_with_openai_s_headers(start: Start, simulator: Server) -> None:
    gateway = start(keys_yaml(simulator))
    answers = [chat(gateway, TEAM_A) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["3", "2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "4" for a in answers)
    assert "x-ratelimit-limit-tokens" not in answers[0].headers  # team-a has no tpm
    refused = answers[-1]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 3600 and refused.headers.get("x-should-retry") != "false"
    assert re.fullmatch(r"(\d+m)?[\d.]+s|\d+ms", refused.headers["x-ratelimit-reset-requests"])
    assert chat(gateway, TEAM_B).status_code == 200  # another key's window is its own
    metrics = scraped(gateway, 'inference_core_key_rejections_total{key="team-a",reason="rpm"} 1.0')
    assert 'inference_core_key_requests_total{key="team-a",status_class="2xx"} 4.0' in metrics
    usage = httpx.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {TEAM_A}"}).json()["data"]
    assert [entry["key"] for entry in usage] == ["team-a"]
    assert usage[0]["current"]["requests"] == 4 and usage[0]["limits"]["rpm"] == 4
    everyone = httpx.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert {entry["key"] for entry in everyone} == {"team-a", "team-b", "others", "admin", "key-1"}


def test_the_sdk_waits_out_the_window_and_succeeds(start: Start, simulator: Server) -> None:
    gateway = start(keys_yaml(simulator, window=2))
    while chat(gateway, TEAM_A).status_code != 429:
        pass
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=3) as sdk:
        started = time.monotonic()
        reply = sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content and time.monotonic() - started < 10
    metrics = httpx.get(gateway.url + "/metrics").text
    refused = re.search(r'inference_core_key_rejections_total\{key="team-a",reason="rpm"\} (\S+)', metrics)
    assert refused and float(refused.group(1)) >= 1


def test_tpm_reserves_then_counts_real_usage(start: Start, simulator: Server) -> None:
    gateway = start(keys_yaml(simulator))
    too_big = chat(gateway, TEAM_B, max_tokens=400)
    assert too_big.status_code == 429 and too_big.json()["error"]["type"] == "tokens"
    assert too_big.headers["x-ratelimit-limit-tokens"] == "300"
    first = chat(gateway, TEAM_B, max_tokens=8)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    assert usage_of(gateway, TEAM_B)["current"]["tokens"] == used  # the reservation corrected by the real usage
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True},
        headers={"authorization": f"Bearer {TEAM_B}"},
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2
    deadline = time.monotonic() + 5
    while (tokens := usage_of(gateway, TEAM_B)["current"]["tokens"]) == used:  # counted as the stream is closed
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert tokens == 2 * used  # the same request streamed: its exact usage, which the client did not ask for
    assert not any('"usage"' in event for event in events)
    completion = first.json()["usage"]["completion_tokens"]
    scraped(gateway, f'inference_core_key_tokens_total{{key="team-b",kind="completion"}} {2 * completion}.0')


def _admitted(gateway: Server, key: str) -> int:
    """The key's requests counted in its rpm window (the last window's too, should one have ended)."""
    usage = usage_of(gateway, key)
    return int(usage["current"]["requests"] + usage["previous"]["requests"])


def _chats(simulator: Server) -> int:
    return int(sim_stats(simulator)["requests"].get("/v1/chat/completions", 0))


def _holding_a_slot(gateway: Server, key: str) -> contextlib.AbstractContextManager[socket.socket]:
    """A stream the backend would take a minute to start: it holds a slot (and one of its key's) until closed."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "sim_fault": "ttft=60"}
    return held(gateway, "/v1/chat/completions", body, headers={"authorization": f"Bearer {key}"})


def test_max_concurrent_queues_the_rest_and_priority_is_clamped(start: Start, log_dir: Path) -> None:
    slow = start_simulator(log_dir, "--ttft", "0.5")
    try:
        # Its rpm counts each request as it is admitted, before it waits for the key's slot.
        extra = "  one-at-a-time:\n    key: sk-one-at-a-time\n    max_concurrent: 1\n    rpm: 1000\n"
        gateway = start(keys_yaml(slow, extra=extra))
        key = "sk-one-at-a-time"
        with ThreadPoolExecutor(2) as pool:
            with _holding_a_slot(gateway, key) as busy:
                until(lambda: _chats(slow) == 1, "the first request never reached the backend")
                answers = [pool.submit(chat, gateway, key) for _ in range(2)]
                until(lambda: _admitted(gateway, key) == 3, "the other two were never admitted")
                assert _chats(slow) == 1, "the other two wait for the key's one slot"
                busy.close()
            assert [a.result().status_code for a in answers] == [200, 200]
        waits = sorted(float(a.result().headers["x-inference-queue-ms"]) for a in answers)
        assert waits[1] >= 500  # the last waited for all of the answer before it (ttft: 0.5 s)
        assert chat(gateway, TEAM_A, priority=0).status_code == 200
        assert sim_stats(slow)["last_body"]["priority"] == 2  # clamped to the key's own priority
        assert chat(gateway, TEAM_A, priority=7).status_code == 200
        assert sim_stats(slow)["last_body"]["priority"] == 7  # a later one is the client's to ask
    finally:
        slow.stop()


def test_fair_share_serves_a_small_key_between_a_big_key_s_backlog(start: Start, log_dir: Path) -> None:
    """Key A has 60 requests waiting for 3 busy slots when key B sends 3; B's are among the first served."""
    slow = start_simulator(log_dir, "--ttft", "0.2")
    try:
        extra = "  big:\n    key: sk-big\n  small:\n    key: sk-small\n"
        gateway = start(keys_yaml(slow, extra=extra), max_concurrent_tasks="3")
        with ThreadPoolExecutor(63) as pool, contextlib.ExitStack() as holds:
            for _ in range(3):
                holds.enter_context(_holding_a_slot(gateway, FLAT))
            until(lambda: _chats(slow) == 3, "the three slots were never taken")
            backlog = [pool.submit(chat, gateway, "sk-big", request_id=f"big-{i}") for i in range(60)]
            until(lambda: metric(gateway, "inference_core_queue_depth") == 60, "the backlog never queued")
            small = [pool.submit(chat, gateway, "sk-small", request_id=f"small-{i}") for i in range(3)]
            until(lambda: metric(gateway, "inference_core_queue_depth") == 63, "key B's requests never queued")
            holds.close()
            assert all(f.result().status_code == 200 for f in backlog + small)
        served = [rid for rid in sim_stats(slow)["request_ids"] if rid.startswith(("big-", "small-"))]
        assert len(served) == 63
        # Served by turns (big, small, big, small...): all three within the first rounds of three, where
        # first come, first served would put them last, after the whole backlog.
        assert max(served.index(f"small-{i}") for i in range(3)) < 12, served
    finally:
        slow.stop()


def test_sighup_reloads_keys(start: Start, simulator: Server, tmp_path: Path) -> None:
    gateway = start(keys_yaml(simulator))
    assert chat(gateway, "sk-new-key-000").status_code == 401
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(chat(gateway, FLAT).status_code)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        until(lambda: len(statuses) > 5, "no traffic before the reload")
        text = keys_yaml(simulator, extra="  newcomer:\n    key: sk-new-key-000\n")
        (tmp_path / "gateway-0.yaml").write_text(text.replace(f"key: {OTHERS}", "key: sk-replaced-0000"))
        os.kill(gateway.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while chat(gateway, "sk-new-key-000").status_code != 200:
            assert time.monotonic() < deadline, gateway.output
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join()
    assert chat(gateway, OTHERS).status_code == 401
    assert len(statuses) > 5 and set(statuses) == {200}
