"""Every endpoint the gateway forwards to a backend, declared once.

Routes, ``/openapi.json``, metric labels (the path) and span names (the operation) all come
from this table, so a new endpoint is one entry here, plus a translation in a provider where a
backend needs one. vLLM's own routes are passed through untouched; any other ``POST /v1/...``
whose body names a model is too (``passthrough``), so the next endpoint vLLM adds works on day one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from inference_core import protocol
from inference_core.errors import NotFound
from inference_core.sse import DONE_MARKERS


@dataclass(frozen=True, slots=True)
class Endpoint:
    #: The route clients call; also the metric label and log field.
    path: str
    #: Where it goes, relative to the backend's API root (``../tokenize`` climbs above ``/v1``).
    upstream: str
    #: The span name's first word and ``gen_ai.operation.name``.
    operation: str
    summary: str
    #: Checked before the request is forwarded, and shown in /docs.
    schema: type[protocol.OpenModel] = protocol.ModelRequest
    #: The answer's shape, for /docs (None: whatever the backend answers).
    response: type[BaseModel] | None = None
    #: ``"stream": true`` is answered with server-sent events.
    streams: bool = False
    #: Only vLLM serves it: a backend of another kind answers 400 naming the endpoint.
    vllm_only: bool = False
    #: What the last event of a complete stream holds (a stream cut before it is an error).
    stream_ends: tuple[bytes, ...] = DONE_MARKERS
    #: Its answers create stored responses whose replica must be remembered (``previous_response_id``).
    stores_responses: bool = False
    method: str = "POST"
    #: The request carries a JSON body (the calls on one stored response carry none).
    body: bool = True
    #: Anthropic's Messages API: its errors (the gateway's own included) take Anthropic's shape.
    anthropic: bool = False
    #: The body is a multipart form (an upload); its ``model`` and ``stream`` are form fields.
    form: bool = False
    #: Its streams report usage only when asked (``stream_options.include_usage``): the gateway asks.
    usage_on_request: bool = False
    #: Its body's prompt (``messages`` or ``prompt``) is what a replica's prefix cache holds: cache_aware routes on it.
    prompted: bool = False


CHAT = Endpoint(
    "/v1/chat/completions", "chat/completions", "chat", "Chat completion",
    protocol.ChatCompletionRequest, protocol.ChatCompletion, streams=True, usage_on_request=True, prompted=True,
)  # fmt: skip
COMPLETIONS = Endpoint(
    "/v1/completions", "completions", "text_completion", "Text completion",
    protocol.CompletionRequest, protocol.Completion, streams=True, usage_on_request=True, prompted=True,
)  # fmt: skip
EMBEDDINGS = Endpoint(
    "/v1/embeddings", "embeddings", "embeddings", "Embeddings", protocol.EmbeddingRequest, protocol.EmbeddingList
)
#: The endpoints whose requests providers translate; the others pass through untouched.
OPENAI = (CHAT, COMPLETIONS, EMBEDDINGS)
RESPONSES = Endpoint(
    "/v1/responses", "responses", "responses", "Create a model response (OpenAI's Responses API)",
    protocol.ResponsesRequest, streams=True, stores_responses=True,
    stream_ends=(b"response.completed", b"response.failed", b"response.incomplete"),
)  # fmt: skip
#: ``/v1/responses/{response_id}`` and what hangs under it, each sent to the replica holding the response.
RESPONSE_ROUTE = "/v1/responses/{response_id:path}"
_RESPONSE_CALLS = {("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")}


def _vllm(path: str, operation: str, summary: str) -> Endpoint:
    upstream = path.removeprefix("/v1/") if path.startswith("/v1/") else ".." + path
    return Endpoint(path, upstream, operation, f"{summary} (vLLM's own API, passed through)", vllm_only=True)


VLLM = (
    _vllm("/tokenize", "tokenize", "Tokenize a prompt or chat messages"),
    _vllm("/detokenize", "detokenize", "Token ids back to text"),
    _vllm("/pooling", "pooling", "A pooling model's raw outputs"),
    _vllm("/classify", "classify", "Classification"),
    _vllm("/score", "score", "Similarity scores of text pairs"),
    _vllm("/v1/score", "score", "Similarity scores of text pairs"),
    _vllm("/rerank", "rerank", "Documents ranked by relevance to a query"),
    _vllm("/v1/rerank", "rerank", "Documents ranked by relevance to a query"),
    _vllm("/v2/rerank", "rerank", "Documents ranked by relevance to a query"),
    _vllm("/v1/chat/completions/batch", "chat", "Several chat conversations in one call"),
)
#: Anthropic's Messages API, as vLLM serves it (Claude Code and the ``anthropic`` SDK point here).
ANTHROPIC = (
    Endpoint(
        "/v1/messages", "messages", "chat", "Create a message (Anthropic's Messages API, served by vLLM)",
        streams=True, vllm_only=True, stream_ends=(b"message_stop",), anthropic=True,
    ),
    Endpoint(
        "/v1/messages/count_tokens", "messages/count_tokens", "count_tokens",
        "Count a message's tokens (Anthropic's Messages API, served by vLLM)", vllm_only=True, anthropic=True,
    ),
)  # fmt: skip
#: Speech to text (vLLM serves it with Whisper models): an upload, relayed as the client sent it.
AUDIO = tuple(
    Endpoint(
        f"/v1/audio/{kind}", f"audio/{kind}", kind.removesuffix("s"), summary, protocol.AudioRequest,
        streams=True, form=True, stream_ends=(*DONE_MARKERS, b"transcript.text.done"),
    )
    for kind, summary in (("transcriptions", "Transcribe audio"), ("translations", "Translate audio into English"))
)  # fmt: skip
#: Routes whose errors take Anthropic's shape.
ANTHROPIC_PATHS = frozenset(endpoint.path for endpoint in ANTHROPIC)
FORWARDED = (*OPENAI, RESPONSES, *ANTHROPIC, *VLLM, *AUDIO)

#: The route of ``passthrough``: one bounded metric label for every endpoint it serves.
PASSTHROUGH_ROUTE = "/v1/{path:path}"
_SAFE_PATH = re.compile(r"[A-Za-z0-9_~-]+(?:[/.][A-Za-z0-9_~-]+)*")


def passthrough(path: str) -> Endpoint:
    """An endpoint under ``/v1`` that the table does not name, forwarded to the same path.

    Only plain paths go upstream (no ``..``, no empty segment, nothing to escape): anything
    else is a route the gateway does not know.
    """
    rest = path.removeprefix("/v1/")
    if not _SAFE_PATH.fullmatch(rest) or ".." in rest:
        raise NotFound(f"Invalid URL (POST {path}).")
    return Endpoint(PASSTHROUGH_ROUTE, rest, "other", "Any other endpoint of the backend's that names a model")


def stored_response(method: str, rest: str) -> tuple[Endpoint, str]:
    """A call on one stored response (``rest`` is what follows ``/v1/responses/``) and its id."""
    response_id, slash, action = rest.partition("/")
    if (method, slash + action) not in _RESPONSE_CALLS or not _SAFE_PATH.fullmatch(response_id):
        raise NotFound(f"Invalid URL ({method} /v1/responses/{rest}).")
    summary = "A stored response: retrieve, delete, cancel, or list its input items"
    endpoint = Endpoint(RESPONSE_ROUTE, f"responses/{rest}", "responses", summary, method=method, body=False)
    return endpoint, response_id
