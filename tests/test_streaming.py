"""SSE relay: events as they arrive, the client's departure reaching the backend, in-band failures."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import MODEL, chat_body, sim_stats
from tests.servers import Server, until


def _events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_events_are_relayed_as_they_arrive(http: httpx.Client, simulator: Server) -> None:
    # 200 tokens take the backend 20 s: the first ones reach the client while it is still at work.
    body = chat_body(stream=True, max_tokens=200, ignore_eos=True, sim_fault="itl=0.1")
    before = sim_stats(simulator)["streams_completed"]
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = (json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: "))
        tokens = [next(events)["choices"][0]["delta"].get("content") for _ in range(3)]
        assert all(tokens[1:]), tokens  # after the assistant's role: two tokens
        assert sim_stats(simulator)["streams_completed"] == before, "the first tokens waited for the whole stream"


def test_stream_ends_with_done(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}) as response:
        events = _events(response)
    assert events[-1] == "[DONE]"


def test_client_disconnect_aborts_upstream(http: httpx.Client, simulator: Server) -> None:
    before = sim_stats(simulator)["streams_aborted"]
    body = chat_body(stream=True, max_tokens=200, sim_fault="itl=0.1")
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # Its 200 tokens take the backend 20 s: stopped within 10 s, it stopped because the client left.
    until(lambda: sim_stats(simulator)["streams_aborted"] != before, "the backend kept generating", seconds=10)


def test_reset_mid_stream_becomes_error_event(http: httpx.Client, client: openai.OpenAI) -> None:
    body = chat_body(stream=True, max_tokens=20, sim_fault="reset_after=2")
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = _events(response)
    assert events[-1].startswith('{"error"') and "[DONE]" not in events
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_body={"sim_fault": "reset_after=2"},
        ):
            pass


def test_stream_without_done_is_reported(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, sim_fault="no_done")) as response:
        events = _events(response)
    assert '"bad_upstream_response"' in events[-1]


def test_error_before_first_byte_is_a_plain_error(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(stream=True, sim_fault="status=503"))
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "server_error"


def test_dropped_params_header_on_streams(openai_gateway: Server) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "top_k": 2}
    with httpx.stream("POST", openai_gateway.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["x-inference-dropped-params"] == "top_k"
        assert _events(response)[-1] == "[DONE]"
