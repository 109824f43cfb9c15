"""Models (ids with slashes, LoRA adapters) and embeddings (float and base64) through the SDK."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import openai
import pytest

from tests.conftest import LORA, MODEL
from tests.openai_schemas import OpenAISchemas


def test_list_models(client: openai.OpenAI, http: httpx.Client, schemas: OpenAISchemas) -> None:
    body = http.get("/v1/models").json()
    schemas.validate("ListModelsResponse", body)
    assert [m.id for m in client.models.list()] == [MODEL, LORA]
    assert body["data"][1]["parent"] == MODEL, "vLLM's own fields are relayed"


def test_retrieve_model_with_slashes(client: openai.OpenAI, http: httpx.Client, schemas: OpenAISchemas) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    body = http.get(f"/v1/models/{MODEL}").json()
    schemas.validate("Model", body)
    assert body["max_model_len"] == 4096


def test_retrieve_unknown_model(client: openai.OpenAI, http: httpx.Client, schemas: OpenAISchemas) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/missing")
    response = http.get("/v1/models/org/missing")
    schemas.validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "model_not_found"


def test_embeddings_float(client: openai.OpenAI, http: httpx.Client, schemas: OpenAISchemas) -> None:
    response = client.embeddings.with_raw_response.create(
        model=MODEL, input=["Hello world", "How are you?"], encoding_format="float"
    )
    schemas.validate("CreateEmbeddingResponse", json.loads(response.content))
    result = response.parse()
    assert [len(item.embedding) for item in result.data] == [384, 384]
    assert result.data[0].embedding != result.data[1].embedding


def test_embeddings_base64_and_dimensions(client: openai.OpenAI, http: httpx.Client, schemas: OpenAISchemas) -> None:
    # The SDK asks for base64 by default and decodes it.
    result = client.embeddings.create(model=MODEL, input="Hello world", dimensions=16)
    assert len(result.data[0].embedding) == 16
    body = http.post("/v1/embeddings", json={"input": "Hello world", "encoding_format": "base64"}).json()
    packed = base64.b64decode(body["data"][0]["embedding"])
    assert len(packed) == 384 * 4
    # OpenAI's schema only describes the float form: check the rest of the body against it.
    body["data"][0]["embedding"] = list(struct.unpack("<384f", packed))
    schemas.validate("CreateEmbeddingResponse", body)


def test_embeddings_are_deterministic(client: openai.OpenAI) -> None:
    first = client.embeddings.create(model=MODEL, input="same text", encoding_format="float")
    second = client.embeddings.create(model=MODEL, input="same text", encoding_format="float")
    assert first.data[0].embedding == second.data[0].embedding
