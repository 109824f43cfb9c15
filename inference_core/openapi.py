"""The gateway's OpenAPI document (``/openapi.json``) and its Swagger UI page (``/docs``).

Built from the wire models in ``protocol`` so the documentation cannot drift from what is checked.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from swagger_ui_bundle import swagger_ui_path

from inference_core import __version__, endpoints, protocol

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "Invalid request",
    "401": "Missing or wrong gateway key (when INFERENCE_GATEWAY_API_KEYS is set), or the backend refused its key",
    "404": "Unknown route or model",
    "408": "The request body did not arrive within INFERENCE_TIMEOUT",
    "413": "Request body too large",
    "429": "The backend's rate limit, after the gateway's retries",
    "500": "The backend failed (relayed), or the gateway did",
    "502": "Backend unreachable or malformed answer",
    "503": "Queue full, queue timeout or draining (with Retry-After), or the backend overloaded",
    "504": "Backend timed out",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    summary: str,
    response: type[BaseModel] | None,
    *,
    body: dict[str, Any] | None = None,
    stream: bool = False,
    anthropic: bool = False,
    form: bool = False,
) -> dict[str, Any]:
    answer = {"type": "object", "description": "The backend's answer, relayed"} if response is None else _ref(response)
    ok: dict[str, Any] = {"description": "Success", "content": _json(answer)}
    if stream:
        ok["content"]["text/event-stream"] = {
            "schema": {"description": "With `stream: true`: `data: <chunk>` events, then `data: [DONE]`."}
        }
    error = protocol.AnthropicErrorResponse if anthropic else protocol.ErrorResponse
    responses = {"200": ok} | {
        status: {"description": text, "content": _json(_ref(error))} for status, text in _ERRORS.items()
    }
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        content = {"multipart/form-data": {"schema": body}} if form else _json(body)
        operation["requestBody"] = {"required": True, "content": content}
    return operation


@functools.cache
def document() -> bytes:
    models: list[type[BaseModel]] = [
        protocol.ChatCompletionChunk, protocol.Model, protocol.ModelList, protocol.ErrorResponse,
        protocol.AnthropicErrorResponse, protocol.BatchResponse,
    ]  # fmt: skip
    for endpoint in endpoints.FORWARDED:
        models += [endpoint.schema] + ([endpoint.response] if endpoint.response else [])
    _, schemas = models_json_schema([(model, "validation") for model in dict.fromkeys(models)], ref_template=_REF)
    paths: dict[str, Any] = {
        endpoint.path: {
            "post": _operation(
                endpoint.summary,
                endpoint.response,
                body=_ref(endpoint.schema),
                stream=endpoint.streams,
                anthropic=endpoint.anthropic,
                form=endpoint.form,
            )
        }
        for endpoint in endpoints.FORWARDED
    }
    stored = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]

    def on_stored(summary: str) -> dict[str, Any]:
        return {**_operation(summary + " (sent to the replica that stored it)", None), "parameters": stored}

    file_id = [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    batch_id = [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    upload = {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch"]}},
    }
    paths |= {
        "/v1/files": {
            "post": _operation("Upload a file (a batch's input, JSONL)", None, body=upload, form=True),
            "get": _operation("List your files (after, limit, order, purpose)", None),
        },
        "/v1/files/{file_id}": {
            "get": {**_operation("Retrieve a file", None), "parameters": file_id},
            "delete": {**_operation("Delete a file", None), "parameters": file_id},
        },
        "/v1/files/{file_id}/content": {"get": {**_operation("A file's content", None), "parameters": file_id}},
        "/v1/batches": {
            "post": _operation(
                "Create a batch from an uploaded JSONL file",
                None,
                body={
                    "type": "object",
                    "required": ["input_file_id", "endpoint", "completion_window"],
                    "properties": {
                        "input_file_id": {"type": "string"},
                        "endpoint": {
                            "enum": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
                        },
                        "completion_window": {"enum": ["24h"]},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
            ),
            "get": _operation("List your batches, newest first (after, limit)", None),
        },
        "/v1/batches/{batch_id}": {"get": {**_operation("Retrieve a batch", None), "parameters": batch_id}},
        "/v1/batches/{batch_id}/cancel": {"post": {**_operation("Cancel a batch", None), "parameters": batch_id}},
        "/v1/responses/{response_id}": {
            "get": on_stored("Retrieve a stored response"),
            "delete": on_stored("Delete a stored response"),
        },
        "/v1/responses/{response_id}/cancel": {"post": on_stored("Cancel a background response")},
        "/v1/responses/{response_id}/input_items": {"get": on_stored("A stored response's input items")},
        "/v1/models": {"get": _operation("List models", protocol.ModelList)},
        "/v1/models/{model_id}": {
            "get": {
                **_operation("Retrieve a model (ids may contain slashes)", protocol.Model),
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            }
        },
        "/v1/batch/chat/completions": {
            "post": _operation(
                "Many chat completions, answered in order",
                protocol.BatchResponse,
                body={
                    "type": "array",
                    "items": {},
                    "description": "Chat completion requests (see ChatCompletionRequest), each checked on its own:"
                    " an invalid one gets an error in its place in the results.",
                },
            )
        },
    }
    return orjson.dumps(
        {
            "openapi": "3.1.0",
            "info": {"title": "inference-core", "version": __version__},
            "paths": paths,
            "components": {"schemas": schemas.get("$defs", {})},
        }
    )


SWAGGER_PAGE = """<!doctype html>
<html><head><title>inference-core API</title><meta charset="utf-8">
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""
#: Swagger UI's own files, served by the gateway (from ``swagger-ui-bundle-v2``) so ``/docs`` works offline.
SWAGGER_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js")


def swagger_asset(name: str) -> Path:
    return Path(str(swagger_ui_path)) / name
