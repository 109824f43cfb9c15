"""Parameter translation: legacy guided decoding on vLLM, structured outputs and dropped params on OpenAI."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import MODEL, SdkFor, chat_body, sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server

FRUITS = {
    "type": "object",
    "properties": {"fruits": {"type": "array", "items": {"type": "string"}, "minItems": 3}},
    "required": ["fruits"],
}


def test_brief_guided_json_example_is_obeyed(client: openai.OpenAI, simulator: Server) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List 3 fruits as JSON"}],
        max_tokens=100,
        extra_body={"guided_json": FRUITS},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), FRUITS)
    sent = sim_stats(simulator)["last_body"]
    assert "guided_json" not in sent
    assert sent["structured_outputs"] == {"json": FRUITS}


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("guided_regex", "[a-z]+", "regex"),
        ("guided_choice", ["yes", "no"], "choice"),
        ("guided_grammar", "root ::= 'a'", "grammar"),
    ],
)
def test_guided_fields_become_structured_outputs(
    http: httpx.Client, simulator: Server, field: str, value: object, key: str
) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(**{field: value, "guided_whitespace_pattern": " "}))
    assert response.status_code == 200
    sent = sim_stats(simulator)["last_body"]
    assert sent["structured_outputs"] == {key: value, "whitespace_pattern": " "}
    assert not any(name.startswith("guided_") for name in sent)
    if field == "guided_choice":
        assert response.json()["choices"][0]["message"]["content"] in value


def test_explicit_structured_outputs_win(http: httpx.Client, simulator: Server) -> None:
    http.post("/v1/chat/completions", json=chat_body(guided_regex="a", structured_outputs={"regex": "b"}))
    assert sim_stats(simulator)["last_body"]["structured_outputs"] == {"regex": "b"}


def test_structured_outputs_and_response_format_pass_through(http: httpx.Client, simulator: Server) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "f", "schema": FRUITS}}
    response = http.post("/v1/chat/completions", json=chat_body(response_format=response_format, max_tokens=100))
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), FRUITS)
    assert sim_stats(simulator)["last_body"]["response_format"] == response_format


def test_completions_translate_too(http: httpx.Client, simulator: Server) -> None:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "guided_choice": ["red", "blue"]})
    assert response.json()["choices"][0]["text"] in ("red", "blue")


def test_old_vllm_keeps_guided_fields(spawn: Callable[..., Server]) -> None:
    backend = spawn("simulator", "--vllm-version", "0.11.2")
    gateway = spawn("gateway", backend.url)
    body = chat_body(guided_json=FRUITS, max_tokens=100)
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body)
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), FRUITS)
    sent = sim_stats(backend)["last_body"]
    assert sent["guided_json"] == FRUITS and "structured_outputs" not in sent
    assert httpx.get(gateway.url + "/health").json()["backend"]["version"] == "0.11.2"


VLLM_ONLY = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "priority": 3, "ignore_eos": True}


def test_openai_drops_vllm_params_and_says_so(openai_gateway: Server, openai_simulator: Server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, **VLLM_ONLY}
    response = httpx.post(openai_gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-inference-dropped-params"].split(",") == list(VLLM_ONLY)
    sent = sim_stats(openai_simulator)["last_body"]
    assert sent["temperature"] == 0.5 and not VLLM_ONLY.keys() & sent.keys()


def test_openai_guided_json_becomes_response_format(
    openai_gateway: Server, openai_simulator: Server, schemas: OpenAISchemas, sdk_for: SdkFor
) -> None:
    sdk = sdk_for(openai_gateway)
    completion = sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "fruits"}], extra_body={"guided_json": FRUITS}
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), FRUITS)
    sent = sim_stats(openai_simulator)["last_body"]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": FRUITS, "strict": True},
    }
    assert "guided_json" not in sent


def test_openai_structured_outputs_json_as_text(openai_gateway: Server, openai_simulator: Server) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"json": json.dumps(FRUITS)}}
    response = httpx.post(openai_gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert sim_stats(openai_simulator)["last_body"]["response_format"]["json_schema"]["schema"] == FRUITS


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "[0-9]+"}, "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "guided_choice"),
        ({"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
        ({"structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
    ],
)
def test_openai_rejects_unexpressible_constraints(
    openai_gateway: Server, schemas: OpenAISchemas, extra: dict[str, object], param: str
) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    response = httpx.post(openai_gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    schemas.validate("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param


def test_openai_strict_mode_refuses_vllm_params(
    spawn: Callable[..., Server], openai_simulator: Server, sdk_for: SdkFor
) -> None:
    gateway = spawn(
        "gateway", openai_simulator.url, provider_type="openai", model="gpt-4o", drop_unsupported_params="false"
    )
    sdk = sdk_for(gateway)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 3}
        )
    assert caught.value.body["param"] == "top_k"  # type: ignore[index]


def test_openai_backend_rejection_is_relayed(openai_gateway: Server, schemas: OpenAISchemas) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "brand_new_field": 1}
    response = httpx.post(openai_gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    schemas.validate("ErrorResponse", response.json())
    assert "brand_new_field" in response.json()["error"]["message"]


def test_openai_embeddings_keep_openai_fields(openai_gateway: Server) -> None:
    body = {"input": "hi", "dimensions": 8, "encoding_format": "float", "truncate_prompt_tokens": 3}
    response = httpx.post(openai_gateway.url + "/v1/embeddings", json=body)
    assert response.status_code == 200
    assert len(response.json()["data"][0]["embedding"]) == 8
    assert response.headers["x-inference-dropped-params"] == "truncate_prompt_tokens"
