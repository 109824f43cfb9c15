"""What the gateway does not act on reaches the other side untouched, in both directions."""

from __future__ import annotations

import httpx

from tests.conftest import chat_body, sim_stats
from tests.servers import Server

FORWARDED = {
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "chat_template_kwargs": {"enable_thinking": False},
    "logprobs": True,
    "top_logprobs": 2,
    "seed": 42,
    "n": 2,
    "stop": ["\n\n", "END"],
    "user": "user-17",
    "metadata": {"team": "search"},
    "priority": -5,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "a_parameter_from_the_future": {"nested": [1, 2.5, None, "x"]},
}


def test_request_fields_reach_vllm_unchanged(http: httpx.Client, simulator: Server) -> None:
    body = chat_body(**FORWARDED)
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert sim_stats(simulator)["last_body"] == body


def test_stream_options_reach_the_backend(http: httpx.Client, simulator: Server) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.read()
    assert sim_stats(simulator)["last_body"]["stream_options"] == body["stream_options"]


def test_backend_only_response_fields_reach_the_client(http: httpx.Client) -> None:
    completion = http.post("/v1/chat/completions", json=chat_body()).json()
    assert "kv_transfer_params" in completion and "prompt_logprobs" in completion
    assert "reasoning_content" in completion["choices"][0]["message"]


def test_no_backend_identity_in_response_headers(http: httpx.Client, simulator: Server) -> None:
    response = http.post("/v1/chat/completions", json=chat_body())
    backend = simulator.url.removeprefix("http://")
    assert not any(backend in value for value in response.headers.values())
    ours = {
        "x-request-id",
        "x-inference-queue-ms",
        "x-inference-retries",
        "x-inference-backend",
        "x-inference-fallbacks",
    }
    assert set(response.headers) <= {"date", "server", "content-length", "content-type", *ours}
