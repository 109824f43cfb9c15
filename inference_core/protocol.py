"""OpenAI wire schemas: what the gateway checks in a request, and what /docs shows.

Requests are checked only for the fields the gateway or its users rely on (types, required
fields); every other field is allowed and forwarded untouched. Responses are relayed as the
backend sent them; their models here only document the shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference_core.errors import InvalidRequest

Stop = str | list[str] | None
JsonSchema = dict[str, Any] | str
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]
Prompt = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class OpenModel(BaseModel):
    """A wire object that may carry fields we do not know (they are forwarded)."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(OpenModel):
    include_usage: bool | None = None


class ChatMessage(OpenModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Sampling(OpenModel):
    """Fields common to chat and text completions, OpenAI's first, then vLLM's extensions."""

    model: str | None = Field(None, description="Defaults to INFERENCE_MODEL.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    priority: int | None = Field(
        None, description="Queue priority, lower is served sooner (also X-Priority); vLLM schedules by it too."
    )
    structured_outputs: dict[str, Any] | None = None
    guided_json: JsonSchema | None = Field(None, description="Legacy vLLM spelling of structured_outputs.json.")
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(OpenModel):
    model: str | None = Field(None, description="Defaults to INFERENCE_MODEL.")
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None
    priority: int | None = Field(None, description="Queue priority: lower is served sooner.")


class ResponsesRequest(OpenModel):
    """OpenAI's Responses API: checked for what the gateway reads; everything else passes through."""

    model: str | None = Field(None, description="Defaults to INFERENCE_MODEL.")
    input: str | list[Any] | None = None
    previous_response_id: str | None = Field(
        None, description="Sent to the replica that created that response (vLLM stores them per replica)."
    )
    stream: bool = False
    priority: int | None = Field(None, description="Queue priority: lower is served sooner.")


class ModelRequest(OpenModel):
    """Any other endpoint's body: checked only for what the gateway reads (the model, the priority)."""

    model: str | None = Field(None, description="Defaults to INFERENCE_MODEL.")
    priority: int | None = Field(None, description="Queue priority: lower is served sooner.")


class AudioRequest(OpenModel):
    """A speech-to-text upload (multipart/form-data); the gateway reads ``model`` and ``stream``."""

    model: str = Field(description="The model, or an alias: it decides the backend.")
    file: bytes = Field(description="The audio file.", json_schema_extra={"format": "binary"})
    stream: bool | None = Field(None, description="true: the text as server-sent events.")


# Responses (documentation only: bodies are relayed as the backend wrote them).


class Usage(OpenModel):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatChoice(OpenModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(OpenModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(OpenModel):
    """One ``data:`` event of a chat stream."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class Completion(OpenModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class Embedding(OpenModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(OpenModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class Model(OpenModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(OpenModel):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Errors on Anthropic's Messages API routes take Anthropic's shape."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None


class BatchResponse(BaseModel):
    results: list[ChatCompletion | ErrorResponse] = Field(
        description="One entry per request, in request order: a completion or an error."
    )


def check(schema: type[OpenModel], payload: object) -> None:
    """Raise ``InvalidRequest`` naming the first field of ``payload`` that ``schema`` rejects."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        schema.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = _param(payload, first["loc"])
        if first["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param) from None
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}.", param=param) from None


def _param(payload: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """The path of the offending value in the request, e.g. ``messages.0.role``.

    Pydantic's locations also name the union member tried (``prompt.str``); those are not places
    in the request, so the path stops where the request has no such key or index.
    """
    path: list[str] = []
    node: Any = payload
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            path.append(part)
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(str(part))
            node = node[part]
        else:
            break
    return ".".join(path)
