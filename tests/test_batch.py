"""The batch endpoint: a list in, results in the same order, failures confined to their item."""

from __future__ import annotations

import time

import httpx

from tests.conftest import chat_body
from tests.openai_schemas import OpenAISchemas


def test_results_in_order(http: httpx.Client, schemas: OpenAISchemas) -> None:
    items = [chat_body(messages=[{"role": "user", "content": f"question {i}"}], max_tokens=i + 1) for i in range(5)]
    response = http.post("/v1/batch/chat/completions", json=items)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["usage"]["completion_tokens"] for r in results] == [1, 2, 3, 4, 5]
    for result in results:
        schemas.validate("CreateChatCompletionResponse", result)


def test_one_failure_fails_only_itself(http: httpx.Client, schemas: OpenAISchemas) -> None:
    items = [
        chat_body(),
        chat_body(model="no-such-model"),
        {"messages": "not a list"},
        chat_body(sim_fault="status=500"),
        chat_body(stream=True),
        chat_body(),
    ]
    results = http.post("/v1/batch/chat/completions", json=items).json()["results"]
    assert len(results) == 6
    assert results[0]["object"] == "chat.completion" and results[5]["object"] == "chat.completion"
    for failed in results[1:5]:
        schemas.validate("ErrorResponse", failed)
    assert results[2]["error"]["param"] == "messages"
    assert results[4]["error"]["param"] == "stream"


def test_items_run_concurrently(http: httpx.Client) -> None:
    items = [chat_body(sim_fault="delay=1") for _ in range(8)]
    started = time.monotonic()
    results = http.post("/v1/batch/chat/completions", json=items).json()["results"]
    assert time.monotonic() - started < 5, "eight 1 s items one after another would take 8 s"
    assert all(r["object"] == "chat.completion" for r in results)


def test_batch_body_must_be_a_list(http: httpx.Client, schemas: OpenAISchemas) -> None:
    response = http.post("/v1/batch/chat/completions", json=chat_body())
    assert response.status_code == 400
    schemas.validate("ErrorResponse", response.json())
    assert http.post("/v1/batch/chat/completions", json=[]).json() == {"results": []}
