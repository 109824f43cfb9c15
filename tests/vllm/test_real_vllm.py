"""The gateway in front of a real vLLM 0.32 (CPU build, tiny random model), through the official SDK."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import time
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.servers import Server, metric, until
from tests.test_batches import finished, jsonl, results
from tests.test_observability import _log_line
from tests.vllm.conftest import EMBEDDING_MODEL, LORA, MODEL

pytestmark = pytest.mark.vllm

FRUITS = {
    "type": "object",
    "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
    "required": ["fruits"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture
def client(gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def _ask(client: openai.OpenAI, **extra: object) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": "Hello!"}]
    return client.chat.completions.create(model=MODEL, messages=messages, **extra)  # type: ignore[arg-type]


def test_chat_and_text_completions(client: openai.OpenAI) -> None:
    chat = _ask(client, max_tokens=8)
    assert chat.model == MODEL and chat.usage is not None and 1 <= chat.usage.completion_tokens <= 8
    text = client.completions.create(model=MODEL, prompt="def main(", max_tokens=8)
    assert text.choices[0].text and text.usage is not None


def test_streams_with_usage(client: openai.OpenAI) -> None:
    chunks = list(_ask(client, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and chunks[-1].usage.completion_tokens <= 8
    text = list(client.completions.create(model=MODEL, prompt="x", max_tokens=5, stream=True))
    assert any(c.choices and c.choices[0].finish_reason for c in text)


def test_a_stream_that_did_not_ask_for_usage_is_counted_exactly(client: openai.OpenAI, gateway: Server) -> None:
    chat = _ask(client, max_tokens=1)
    assert chat.usage is not None
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "stream": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers={"x-request-id": "vllm-usage"}, timeout=120
    ) as answer:
        relayed = answer.read()
    # What vLLM itself sends a client that did not ask: no usage anywhere.
    assert b'"usage"' not in relayed and relayed.endswith(b"data: [DONE]\n\n")
    line = _log_line(gateway, "vllm-usage")
    assert line["prompt_tokens"] == chat.usage.prompt_tokens and 1 <= line["completion_tokens"] <= 8


def test_logprobs(client: openai.OpenAI) -> None:
    chat = _ask(client, max_tokens=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content[0].top_logprobs) == 2


def test_brief_guided_json_example(client: openai.OpenAI) -> None:
    # vLLM 0.32 ignores guided_json: only the gateway's translation makes this JSON.
    chat = _ask(client, max_tokens=200, extra_body={"guided_json": FRUITS})
    jsonschema.validate(json.loads(chat.choices[0].message.content or ""), FRUITS)


def test_guided_regex_and_choice(client: openai.OpenAI) -> None:
    regex = _ask(client, max_tokens=20, extra_body={"guided_regex": "[a-z]{3,6}"})
    assert re.fullmatch("[a-z]{3,6}", regex.choices[0].message.content or "")
    choice = _ask(client, max_tokens=10, extra_body={"guided_choice": ["red", "green", "blue"]})
    assert choice.choices[0].message.content in ("red", "green", "blue")


def test_structured_outputs_and_response_format(client: openai.OpenAI) -> None:
    direct = _ask(client, max_tokens=200, extra_body={"structured_outputs": {"json": FRUITS}})
    jsonschema.validate(json.loads(direct.choices[0].message.content or ""), FRUITS)
    response_format = {"type": "json_schema", "json_schema": {"name": "fruits", "schema": FRUITS}}
    formatted = _ask(client, max_tokens=200, response_format=response_format)
    jsonschema.validate(json.loads(formatted.choices[0].message.content or ""), FRUITS)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(client: openai.OpenAI, tool_choice: object) -> None:
    chat = _ask(client, max_tokens=300, tools=[WEATHER], tool_choice=tool_choice)
    call = chat.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_lora_adapter_by_name(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    assert {MODEL, LORA} <= listed.keys()
    assert (
        client.chat.completions.create(model=LORA, messages=[{"role": "user", "content": "hi"}], max_tokens=4).model
        == LORA
    )


def test_embeddings(embed_gateway: Server) -> None:
    with openai.OpenAI(base_url=embed_gateway.url + "/v1", api_key="unused", max_retries=0) as sdk:
        floats = sdk.embeddings.create(model=EMBEDDING_MODEL, input=["Hello world", "Bonjour"], encoding_format="float")
    assert [len(item.embedding) for item in floats.data] == [384, 384]
    raw = httpx.post(
        embed_gateway.url + "/v1/embeddings", json={"input": "Hello world", "encoding_format": "base64"}, timeout=60
    ).json()
    assert len(base64.b64decode(raw["data"][0]["embedding"])) == 384 * 4


def test_priority_ordering(gateway: Server, vllm_chat: Server) -> None:
    """One sequence slot: a high-priority request overtakes a low-priority one queued before it."""

    def ask(priority: int, max_tokens: int) -> float:
        body = {
            "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens, "priority": priority,
            "ignore_eos": True,
        }  # fmt: skip
        response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return time.monotonic()

    def shown(waiting: int) -> bool:
        """vLLM runs one request and has ``waiting`` more in its queue."""
        counts = metric(vllm_chat, "vllm:num_requests_running"), metric(vllm_chat, "vllm:num_requests_waiting")
        return counts == (1, waiting)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        long_low = pool.submit(ask, 10, 600)
        until(lambda: shown(0), "the long request never started")
        queued_low = pool.submit(ask, 10, 20)
        until(lambda: shown(1), "the low-priority request never queued")
        queued_high = pool.submit(ask, -10, 20)
        until(lambda: shown(2), "the high-priority request never queued")
        assert queued_high.result() < queued_low.result()
        long_low.result()


def _abort_count(vllm_chat: Server) -> float:
    text = httpx.get(vllm_chat.url + "/metrics").text
    found = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)', text, re.M)
    return float(found.group(1)) if found else 0.0


def _generated(vllm_chat: Server) -> float:
    text = httpx.get(vllm_chat.url + "/metrics").text
    found = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_disconnect_mid_stream_aborts_in_vllm(gateway: Server, vllm_chat: Server) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    before = _generated(vllm_chat)
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    until(lambda: metric(vllm_chat, "vllm:num_requests_running") == 0, "vLLM kept generating after the client left")
    assert 0 < _generated(vllm_chat) - before < 1000, "vLLM let go of the request before its 1000 tokens"


def test_vllm_errors_reach_the_client(gateway: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    too_long = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000},
        timeout=60,
    )
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["param"] == "max_tokens" and "max_tokens" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] is None


def test_vllm_own_routes_pass_through(gateway: Server, embed_gateway: Server) -> None:
    """vLLM's tokenizer and a pooling route, reached through the gateway's passthrough table."""
    tokens = httpx.post(gateway.url + "/tokenize", json={"model": MODEL, "prompt": "def main():"}, timeout=60)
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert tokens.json()["count"] == len(ids) > 0
    text = httpx.post(gateway.url + "/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60)
    assert text.status_code == 200 and "main" in text.json()["prompt"]
    pooled = httpx.post(embed_gateway.url + "/pooling", json={"model": EMBEDDING_MODEL, "input": "x"}, timeout=60)
    assert pooled.status_code == 200, pooled.text
    assert pooled.json()["data"][0]["data"]


def test_anthropic_messages_through_the_sdk(gateway: Server) -> None:
    """vLLM's Anthropic-compatible /v1/messages, plain and streamed, with Anthropic's own SDK."""
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=120) as claude:
        hello: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hello!"}]
        message = claude.messages.create(model=MODEL, max_tokens=8, messages=hello)
        assert message.type == "message" and 1 <= message.usage.output_tokens <= 8
        with claude.messages.stream(model=MODEL, max_tokens=8, messages=hello) as stream:
            final = stream.get_final_message()
        assert final.stop_reason in ("end_turn", "max_tokens")


def test_a_batch_through_real_vllm(client: openai.OpenAI) -> None:
    """Lines through the engine to vLLM: plain, guided (translated), and one vLLM refuses (in the error file)."""

    def line(custom_id: str, **body: object) -> dict[str, object]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": custom_id}], "max_tokens": 5, **body}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}

    lines = [line(f"q{i}") for i in range(4)]
    lines += [line("fruits", max_tokens=200, guided_json=FRUITS), line("too-long", max_tokens=5000)]
    source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = finished(client, batch.id, seconds=300)
    output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    assert done.status == "completed"
    assert sorted(r["custom_id"] for r in output) == ["fruits", "q0", "q1", "q2", "q3"]
    fruits = next(r for r in output if r["custom_id"] == "fruits")["response"]["body"]
    jsonschema.validate(json.loads(fruits["choices"][0]["message"]["content"]), FRUITS)
    assert [(r["custom_id"], r["response"]["status_code"]) for r in errors] == [("too-long", 400)]
