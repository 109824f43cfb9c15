"""Exact usage for every stream and every batch entry, without changing what the client receives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from inference_core import sse
from inference_core.engine import usage
from inference_core.engine.call import Outcome
from tests.conftest import MODEL, Configured, chat_body, sim_stats
from tests.servers import Server
from tests.test_observability import _log_line, scrape

# The pure parts: asking for usage in the client's bytes, and taking it out of the stream.


def test_asking_splices_the_field_into_the_clients_bytes() -> None:
    payload = {"model": "m", "stream": True}
    asked, raw = usage.ask(payload, b' {"model": "m", "stream": true}')
    assert asked == payload | {"stream_options": {"include_usage": True}}
    assert raw is not None and orjson.loads(raw) == asked


@pytest.mark.parametrize("options", [{"include_usage": False, "other": 1}, None])
def test_asking_keeps_the_clients_other_stream_options(options: dict[str, Any] | None) -> None:
    payload = {"model": "m", "stream": True, "stream_options": options}
    asked, raw = usage.ask(payload, orjson.dumps(payload))
    assert raw is None  # serialised again: the field is there already
    assert asked["stream_options"] == {**(options or {}), "include_usage": True}


def test_what_counts_as_asked() -> None:
    assert usage.asked({"stream_options": {"include_usage": True}})
    assert usage.asked({"stream_options": {"continuous_usage_stats": True}})  # vLLM's per-chunk usage: left alone
    assert not usage.asked({"stream_options": {"include_usage": False}})
    assert not usage.asked({"stream_options": None}) and not usage.asked({})


def _relayed(frames: list[bytes]) -> tuple[list[bytes], Outcome]:
    async def source() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    async def relay() -> list[bytes]:
        return [frame async for frame in usage.counted(source(), outcome, hide=True)]

    outcome = Outcome()
    return asyncio.run(relay()), outcome


def test_hiding_takes_out_the_usage_event_and_null_fields() -> None:
    chunk = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\"usage\\":null"}}],"usage":null}\n\n'
    final = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    spaced = b'data: {"id": "c", "choices": [{"index": 0}], "usage": null}\n\n'
    relayed, outcome = _relayed([chunk, spaced, final + b"data: [DONE]\n\n"])
    assert relayed == [
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\"usage\\":null"}}]}\n\n',
        b'data: {"id": "c", "choices": [{"index": 0}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (3, 2)
    relayed, _ = _relayed([final, b"data: [DONE]\n\n"])
    assert relayed == [b"data: [DONE]\n\n"]  # an event that was only the usage is not sent at all


# Through a running gateway.


def _events(url: str, body: dict[str, Any], request_id: str) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"x-request-id": request_id}) as answer:
        assert answer.status_code == 200
        text = answer.read()
    assert b'"usage"' not in text or body.get("stream_options"), text
    return [json.loads(line[6:]) for line in text.decode().split("\n\n") if line.startswith("data: {")]


def _without_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in event.items() if k not in ("id", "created")} for event in events]


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_a_stream_that_did_not_ask_is_counted_exactly_and_unchanged(
    backend: str, gateway: Server, simulator: Server, openai_gateway: Server, openai_simulator: Server
) -> None:
    front, behind = (gateway, simulator) if backend == "vllm" else (openai_gateway, openai_simulator)
    model = MODEL if backend == "vllm" else "gpt-4o"
    body = chat_body(model=model, stream=True, max_tokens=6)
    through = _events(front.url, body, f"usage-{backend}")
    assert sim_stats(behind)["last_body"]["stream_options"] == {"include_usage": True}  # asked for the client
    direct = _events(behind.url, body, f"usage-direct-{backend}")
    assert _without_ids(through) == _without_ids(direct)  # what the client would have had without the gateway
    asked = _events(front.url, body | {"stream_options": {"include_usage": True}}, f"usage-asked-{backend}")
    reported = asked[-1]["usage"]
    assert asked[-1]["choices"] == [] and all("usage" in event for event in asked)  # relayed as the backend sent it
    line = _log_line(front, f"usage-{backend}")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        reported["prompt_tokens"],
        reported["completion_tokens"],
    )


def test_a_backend_that_refuses_stream_options_is_not_asked(configured: Configured, simulator: Server) -> None:
    gateway = configured(
        f"backends:\n  old:\n    base_url: {simulator.url}/v1\n    stream_usage: false\nmodel: {MODEL}\n"
    )
    _events(gateway.url, chat_body(stream=True), "usage-refused")
    assert "stream_options" not in sim_stats(simulator)["last_body"]
    assert _log_line(gateway, "usage-refused")["completion_tokens"] is None  # counted by events, as before


def test_batch_entries_are_counted(gateway: Server, http: httpx.Client) -> None:
    before = scrape(gateway)
    entries = [chat_body(max_tokens=3), chat_body(max_tokens=5), chat_body(model="no-such-model")]
    answer = http.post("/v1/batch/chat/completions", json=entries, headers={"x-request-id": "usage-batch"}).json()
    used = [result["usage"] for result in answer["results"][:2]]
    line = _log_line(gateway, "usage-batch")
    assert line["prompt_tokens"] == sum(u["prompt_tokens"] for u in used)
    assert line["completion_tokens"] == sum(u["completion_tokens"] for u in used) == 8
    after = scrape(gateway)
    sample = ("inference_core_tokens_total", frozenset({("kind", "completion"), ("model", MODEL)}))
    assert after[sample] - before.get(sample, 0) == 8


def test_batch_tokens_count_for_their_key(configured: Configured, simulator: Server) -> None:
    gateway = configured(
        f"backends:\n  local:\n    base_url: {simulator.url}/v1\nmodel: {MODEL}\n"
        "keys:\n  team:\n    key: sk-team-usage-0123456789\n    tpm: 100000\n"
    )
    headers = {"authorization": "Bearer sk-team-usage-0123456789"}
    answer = httpx.post(
        gateway.url + "/v1/batch/chat/completions", json=[chat_body(), chat_body()], headers=headers, timeout=30
    ).json()
    total = sum(result["usage"]["total_tokens"] for result in answer["results"])
    report = httpx.get(gateway.url + "/v1/usage", headers=headers).json()["data"][0]
    assert report["current"]["tokens"] == total
    completion = sum(result["usage"]["completion_tokens"] for result in answer["results"])
    sample = ("inference_core_key_tokens_total", frozenset({("key", "team"), ("kind", "completion")}))
    assert scrape(gateway)[sample] == completion


def test_usage_is_found_in_every_api_s_stream() -> None:
    chat = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    started = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7}}}\n\n'
    delta = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}\n\n'
    done = b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":5,"output_tokens":6}}}\n\n'
    assert sse.usages(chat) == [{"prompt_tokens": 3, "completion_tokens": 2}]
    assert sse.usages(started + delta) == [{"input_tokens": 7}, {"output_tokens": 4}]
    assert sse.usages(done) == [{"input_tokens": 5, "output_tokens": 6}]
    assert sse.usages(b'data: {"choices":[],"usage":null}\n\n') == []
    outcome = Outcome()
    for usage_found in sse.usages(started + delta):
        outcome.count_usage(usage_found)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 4)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 5}),
    ],
)
def test_anthropic_and_responses_streams_are_counted(
    gateway: Server, http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    whole = http.post(path, json=body).json()["usage"]
    request_id = f"usage-stream-{path.rsplit('/', 1)[1]}"
    with http.stream("POST", path, json=body | {"stream": True}, headers={"x-request-id": request_id}) as answer:
        assert answer.status_code == 200
        answer.read()
    line = _log_line(gateway, request_id)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (whole["input_tokens"], whole["output_tokens"])
