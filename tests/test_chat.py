"""Chat and text completions through the gateway with the official SDK, checked against OpenAI's schemas."""

from __future__ import annotations

import asyncio
import json

import openai

from tests.conftest import LORA, MODEL, sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["location", "days"],
        },
    },
}


def test_chat_completion(client: openai.OpenAI, schemas: OpenAISchemas) -> None:
    response = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=5
    )
    body = json.loads(response.content)
    schemas.validate("CreateChatCompletionResponse", body)
    completion = response.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


def test_model_defaults_to_configured(client: openai.OpenAI, simulator: Server) -> None:
    completion = client.chat.completions.create(
        model=openai.omit, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert completion.model == MODEL
    assert sim_stats(simulator)["last_body"]["model"] == MODEL


def test_lora_adapter_is_a_model_name(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=LORA, messages=[{"role": "user", "content": "Hi"}])
    assert completion.model == LORA


def test_async_client_concurrent(gateway: Server, schemas: OpenAISchemas) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as sdk:
            replies = await asyncio.gather(
                *(
                    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"n{i}"}])
                    for i in range(20)
                )
            )
        for reply in replies:
            schemas.validate("CreateChatCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))
        return [reply.choices[0].message.content or "" for reply in replies]

    contents = asyncio.run(run())
    assert len(contents) == 20 and all(contents)


def test_stream_chunks_and_usage(client: openai.OpenAI, schemas: OpenAISchemas) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for chunk in chunks:
        schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_async_stream(gateway: Server) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert len(asyncio.run(run()).split()) == 4


def test_tool_call_required(client: openai.OpenAI, schemas: OpenAISchemas) -> None:
    response = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in London?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    schemas.validate("CreateChatCompletionResponse", json.loads(response.content))
    call = response.parse().choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["location"], str) and arguments["days"] >= 1


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_logprobs_and_n(client: openai.OpenAI, schemas: OpenAISchemas) -> None:
    response = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        n=2,
        seed=7,
    )
    schemas.validate("CreateChatCompletionResponse", json.loads(response.content))
    completion = response.parse()
    assert len(completion.choices) == 2
    assert len(completion.choices[0].logprobs.content[0].top_logprobs) == 2


def test_multimodal_content_parts(client: openai.OpenAI, simulator: Server) -> None:
    content = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert sim_stats(simulator)["last_body"]["messages"][0]["content"] == content


def test_text_completion(client: openai.OpenAI, schemas: OpenAISchemas) -> None:
    response = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon", max_tokens=4, logprobs=1)
    schemas.validate("CreateCompletionResponse", json.loads(response.content))
    assert len(response.parse().choices[0].text.split()) == 4


def test_text_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=5, stream=True))
    assert len("".join(c.choices[0].text for c in chunks if c.choices).split()) == 5
    assert chunks[-1].choices[0].finish_reason == "length"
