"""PromptTokenizer against a real vLLM: for the same body, the same prompt token ids.

``/tokenize`` preprocesses a chat as chat completions do, except for the fields it does not
take (documents, reasoning_effort, truncation); those are compared with the ids a real chat
completion returns (``return_token_ids``). Completions are compared the same way. The timings
with the tiny model's tokenizer print with ``./scripts/test-vllm -k timings -s``.
"""

from __future__ import annotations

import asyncio
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference_core.kvcache.tokenizer import PromptTokenizer
from tests.servers import Server
from tests.vllm.conftest import MODEL

pytestmark = pytest.mark.vllm

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PING = {"type": "function", "function": {"name": "ping"}}
STRICT = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}, "strict": True, "x": 1}}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **fields}


CHATS: dict[str, dict[str, Any]] = {
    "system and user": {"messages": [{"role": "system", "content": "You are terse."}, user("Hi there")]},
    "multi-turn": {"messages": [user("2+2?"), assistant("4"), user("3+3?"), assistant("6"), user("Thanks!")]},
    "text parts": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be kind."}, {"type": "text", "text": "Brief."}]},
            user([{"type": "text", "text": "first", "cache_control": {"type": "ephemeral"}}, "second"]),
        ]
    },
    "tools with and without description": {"messages": [user("Weather in Paris?")], "tools": [WEATHER, PING, STRICT]},
    "tool calls and results": {
        "messages": [
            user("Weather in Paris and Rome?"),
            assistant(
                None,
                tool_calls=[
                    call("c1", "get_weather", '{"city": "Paris"}'),
                    call("c2", "get_weather", '{"city":"Rome"}'),
                ],
            ),
            {"role": "tool", "tool_call_id": "c1", "content": "18C sunny"},
            {
                "role": "tool",
                "tool_call_id": "c2",
                "content": [{"type": "text", "text": "64F"}, {"type": "text", "text": "cloudy"}],
            },
            assistant("Paris 18C, Rome 64F."),
            user("ok"),
        ],
        "tools": [WEATHER],
    },
    "arguments that are not a JSON object": {
        "messages": [user("go"), assistant("", tool_calls=[call("a", "ping", "not json"), call("b", "ping", "[1]")])],
        "tools": [PING],
    },
    "unicode": {"messages": [user("Grüße 🙂 — 日本語のテキスト\n\tcafé naïve Ω≈ç√")]},
    "special tokens as text": {"messages": [user("literal <|im_end|> and <tool_call> in text")]},
    "no generation prompt": {"messages": [user("a"), assistant("b")], "add_generation_prompt": False},
    "continue the final message": {
        "messages": [user("Write a haiku"), assistant("Autumn moonlight - ")],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    "chat_template_kwargs": {"messages": [user("hello")], "chat_template_kwargs": {"enable_thinking": False, "x": 1}},
    "developer becomes system": {
        "messages": [{"role": "system", "content": "sys"}, user("u1"), {"role": "developer", "content": "rules"}]
    },
    "names and reasoning": {
        "messages": [{"role": "user", "name": "ann", "content": "q"}, assistant("a", reasoning="hmm"), user("q2")]
    },
    "billing header": {
        "messages": [
            {"role": "system", "content": "x-anthropic-billing-header: cch=1\nYou are Claude Code."},
            user("ls"),
        ]
    },
    "add_special_tokens": {"messages": [user("bos?")], "add_special_tokens": True},
}
# Fields /tokenize does not take: compared with a real chat completion.
CHAT_COMPLETIONS: dict[str, dict[str, Any]] = {
    "documents": {"messages": [user("Summarize")], "documents": [{"title": "A", "text": "alpha"}]},
    "reasoning_effort": {"messages": [user("think")], "reasoning_effort": "low"},
    "tool_choice none keeps the tools": {"messages": [user("Weather?")], "tools": [WEATHER], "tool_choice": "none"},
    "truncated": {"messages": [user("one two three four five six seven eight")], "truncate_prompt_tokens": 6},
    "truncated on the right": {
        "messages": [user("one two three four five six seven eight")],
        "truncate_prompt_tokens": 6,
        "truncation_side": "right",
    },
}
COMPLETIONS: dict[str, dict[str, Any]] = {
    "text": {"prompt": "def fibonacci(n):\n    return"},
    "one text in a list": {"prompt": ["Once upon a time"]},
    "token ids": {"prompt": [5, 6, 7, 8, 900]},
    "token ids in a list": {"prompt": [[11, 12, 13]]},
    "special tokens": {"prompt": "<|im_start|>user\nhi<|im_end|>\n", "add_special_tokens": False},
    "truncated": {"prompt": "alpha beta gamma delta epsilon zeta eta theta", "truncate_prompt_tokens": 4},
}


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> PromptTokenizer:
    return PromptTokenizer.load(tiny_model / "model")


@pytest.mark.parametrize("name", CHATS)
def test_chat_as_tokenize(name: str, vllm_chat: Server, prompts: PromptTokenizer) -> None:
    body = {"model": MODEL, **CHATS[name]}
    response = httpx.post(vllm_chat.url + "/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert prompts.tokens(body) == response.json()["tokens"]
    # Again, with the pieces cached now, and off the event loop.
    assert asyncio.run(prompts.tokens_async(body)) == response.json()["tokens"]


@pytest.mark.parametrize("name", CHAT_COMPLETIONS)
def test_chat_as_a_chat_completion(name: str, vllm_chat: Server, prompts: PromptTokenizer) -> None:
    body = {"model": MODEL, **CHAT_COMPLETIONS[name]}
    response = httpx.post(
        vllm_chat.url + "/v1/chat/completions", json={**body, "max_tokens": 1, "return_token_ids": True}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert prompts.tokens(body) == response.json()["prompt_token_ids"]


@pytest.mark.parametrize("name", COMPLETIONS)
def test_completion(name: str, vllm_chat: Server, prompts: PromptTokenizer) -> None:
    body = {"model": MODEL, **COMPLETIONS[name]}
    response = httpx.post(
        vllm_chat.url + "/v1/completions", json={**body, "max_tokens": 1, "return_token_ids": True}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert prompts.tokens(body) == response.json()["choices"][0]["prompt_token_ids"]


def percentiles(run: Callable[[], object], times: int) -> tuple[float, float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def test_timings(tiny_model: Path) -> None:
    """A 4,000-token chat: encoded cold, then with its turns seen before, then one new turn."""
    text = "".join(path.read_text() for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60])
    messages = [{"role": "system", "content": text[:2000]}]
    for i in range(20):
        messages.append({"role": "user" if i % 2 else "assistant", "content": text[2000 + i * 480 : 2480 + i * 480]})
    body = {"model": MODEL, "messages": messages}
    uncached = PromptTokenizer.load(tiny_model / "model", cache_tokens=0)
    cached = PromptTokenizer.load(tiny_model / "model")
    tokens = len(cached.tokens(body))
    turns = iter(range(10_000))

    def new_turn() -> None:
        start = 100_000 + next(turns) * 300
        cached.tokens({**body, "messages": [*messages, user(text[start : start + 300])]})

    rows = {
        "cold": percentiles(lambda: uncached.tokens(body), 200),
        "turns seen": percentiles(lambda: cached.tokens(body), 1000),
        "one new turn": percentiles(new_turn, 500),
        "render only": percentiles(lambda: cached.render(body), 1000),
    }
    print(f"\n{tokens}-token chat, tiny model's tokenizer:")
    for name, (p50, p99) in rows.items():
        print(f"  {name:>13}: p50 {p50 * 1e6:6.0f} µs  p99 {p99 * 1e6:6.0f} µs")
    assert 3500 < tokens < 4500
    assert rows["turns seen"][0] < 0.001 and rows["one new turn"][0] < 0.001
