"""The simulator's HTTP API: vLLM's or OpenAI's, chosen by ``SimulatorConfig.mode``.

Faults are asked for per request with the ``x-sim-fault`` header or a ``sim_fault`` body field
(a form field in an audio upload; it passes through a gateway untouched), or for every request
with ``SimulatorConfig.fault``: comma-separated ``status=503``, ``retry_after=2``, ``delay=1.5``
(seconds before answering), ``reset_after=3`` (drop the connection after 3 stream chunks),
``malformed`` (invalid JSON), ``no_done`` (stream without ``[DONE]``, or an OpenAI transcription
without its ``transcript.text.done``), ``ttft=0.5``, ``itl=0.02``,
``huge=N`` (a completion of about N MB), and ``times=N`` (only the first N requests asking for
this exact fault string get it).
``GET /_sim/stats`` tells what it saw, with ``Scheduler.stats``; ``POST /_sim/reset`` forgets what
it saw; ``POST /_sim/kv`` steers the KV events (``Scheduler.steer``: ``{"drop": N}``, ``{"silent": bool}``).

What a vLLM replica does with a prompt before answering (queue its prefill, look it up in the
prefix cache, publish the KV events) is ``scheduler.py``'s: chat and text completions are
tokenized as ``/tokenize`` does when that is modelled, wait for ``Scheduler.prefilled``, then for
the ``ttft`` every answer waits, and report ``cached_tokens`` with ``prompt_tokens_details`` on;
``POST /reset_prefix_cache`` empties the cache, as vLLM's does.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from inference_core.simulator import audio, generate, messages, native
from inference_core.simulator.prefix_cache import DEFAULT_BLOCK_SIZE
from inference_core.simulator.responses import ResponseStore, Unknown
from inference_core.simulator.scheduler import Scheduler

#: Chat fields the OpenAI API knows; anything else is refused in ``openai`` mode, as OpenAI does.
OPENAI_CHAT_FIELDS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
        "logit_bias", "logprobs", "top_logprobs", "user", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "metadata", "store", "service_tier",
        "reasoning_effort", "modalities", "audio", "prediction", "web_search_options", "functions",
        "function_call", "verbosity", "prompt_cache_key", "safety_identifier",
    }
)  # fmt: skip
OPENAI_COMPLETION_FIELDS = frozenset(
    {
        "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n",
        "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
        "echo", "suffix", "best_of",
    }
)  # fmt: skip
OPENAI_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
OPENAI_RESPONSES_FIELDS = frozenset(
    {
        "model", "input", "instructions", "previous_response_id", "stream", "stream_options", "store",
        "max_output_tokens", "temperature", "top_p", "metadata", "tools", "tool_choice", "text", "reasoning",
        "user", "include", "parallel_tool_calls", "truncation", "background", "service_tier",
    }
)  # fmt: skip
#: Fields vLLM adds to every completion; clients see them because the gateway relays bodies as sent.
VLLM_EXTRAS = {"service_tier": None, "prompt_logprobs": None, "kv_transfer_params": None}
FAULT_FIELD = "sim_fault"
#: The context length the simulated model reports; longer outputs are refused, as vLLM does.
MAX_MODEL_LEN = 4096
GUIDED_KEYS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass
class SimulatorConfig:
    mode: str = "vllm"
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    lora: tuple[str, ...] = ()
    vllm_version: str = "0.12.0"
    ttft: float = 0.0
    itl: float = 0.0
    dimensions: int = 384
    fault: str = ""
    #: Added to ``vllm:num_requests_waiting`` at /metrics, to fake a busy server.
    reported_waiting: int = 0
    #: Blocks in the modelled prefix cache (vLLM's ``--num-gpu-blocks-override``); 0: none modelled.
    prefix_cache_blocks: int = 0
    #: Tokens per cache block (vLLM's ``--block-size``).
    block_size: int = DEFAULT_BLOCK_SIZE
    #: Seconds of prefill per uncached prompt token, added to ``ttft``; prefills queue one at a time.
    prefill_per_token: float = 0.0
    #: ``usage.prompt_tokens_details.cached_tokens`` in answers (vLLM's ``--enable-prompt-tokens-details``).
    prompt_tokens_details: bool = False
    #: A tokenizer directory: ``/tokenize`` and the prefix cache use it instead of the text's UTF-8 bytes.
    tokenizer: str | None = None
    #: ZMQ endpoint to bind the KV events' PUB socket on (``tcp://127.0.0.1:5557``); "": no events.
    kv_events: str = ""
    #: ZMQ endpoint to bind the replay ROUTER socket on; "": no replay.
    kv_replay: str = ""
    kv_topic: str = "kv"


@dataclass
class Stats:
    """What the simulator saw, for tests to assert on."""

    requests: Counter[str] = field(default_factory=Counter)
    streams_completed: int = 0
    streams_aborted: int = 0
    connections: set[str] = field(default_factory=set)
    http_versions: Counter[str] = field(default_factory=Counter)
    request_ids: list[str] = field(default_factory=list)
    faults_served: Counter[str] = field(default_factory=Counter)
    last_body: Any = None
    last_headers: dict[str, str] = field(default_factory=dict)

    def as_json(self, **extra: Any) -> bytes:
        return orjson.dumps(
            {
                "requests": dict(self.requests),
                "streams_completed": self.streams_completed,
                "streams_aborted": self.streams_aborted,
                "connections": len(self.connections),
                "http_versions": dict(self.http_versions),
                "request_ids": self.request_ids[-1000:],
                "last_body": self.last_body,
                "last_headers": self.last_headers,
                **extra,
            }
        )


class SimulatedError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


async def _answer_error(request: Request, exc: Exception) -> Response:
    """A ``SimulatedError`` raised by any route, as its answer."""
    assert isinstance(exc, SimulatedError)
    return _json(exc.body, exc.status, exc.headers)


def _faults(spec: str) -> dict[str, str]:
    return dict(([*part.split("=", 1), ""])[:2] for part in spec.split(",") if part.strip())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


#: A prompt's token ids from a chat or completion body; ``ValueError``/``TypeError`` if it has none.
Tokenize = Callable[[dict[str, Any]], list[int]]


def _tokenizer(directory: str | None) -> Tokenize:
    """The tokenizer in ``directory`` (its libraries imported only then), else the text's UTF-8 bytes."""
    if directory is None:
        return native.prompt_tokens
    from inference_core.kvcache.tokenizer import PromptTokenizer

    tokens: Tokenize = PromptTokenizer.load(directory).tokens
    return tokens


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.responses = ResponseStore()
        self.vllm = config.mode == "vllm"
        self.honours_guided = self.vllm and _version(config.vllm_version) < (0, 12)
        self.tokens = _tokenizer(config.tokenizer)
        self.scheduler = Scheduler(
            model=config.model, lora=config.lora, blocks=config.prefix_cache_blocks, block_size=config.block_size,
            prefill_per_token=config.prefill_per_token, reported_waiting=config.reported_waiting,
            kv_events=config.kv_events, kv_replay=config.kv_replay, kv_topic=config.kv_topic,
        )  # fmt: skip

    # Errors, in each backend's own shape.

    def error(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> SimulatedError:
        if self.vllm:
            kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
            return SimulatedError(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "server_error"
        )
        return SimulatedError(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

    def models(self) -> list[str]:
        return [self.config.model, *self.config.lora]

    # The request path.

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        self.stats.requests[path] += 1
        self.stats.http_versions[request.scope["http_version"]] += 1
        if "x-request-id" in request.headers:
            self.stats.request_ids.append(request.headers["x-request-id"])
        client = request.client
        if client is not None:
            self.stats.connections.add(f"{client.host}:{client.port}")
        if request.method == "POST":  # not the gateway's health probes, which would race with tests
            headers = {k: v for k, v in request.headers.items() if k != "authorization"}
            headers["has_authorization"] = str("authorization" in request.headers).lower()
            # A digest, so a test can tell which key arrived without the simulator holding it.
            authorization = request.headers.get("authorization", "").encode()
            headers["authorization_sha256"] = hashlib.sha256(authorization).hexdigest()
            self.stats.last_headers = headers
        body: Any = None
        if request.method == "POST":
            body = self.stats.last_body = await self._body(request)
        asked = request.headers.get("x-sim-fault", "")
        if isinstance(body, dict) and isinstance(body.get(FAULT_FIELD), str):
            asked = body.pop(FAULT_FIELD)
        faults = _faults(self.config.fault) | _faults(asked)
        if "delay" in faults:
            await asyncio.sleep(float(faults["delay"]))
        if "times" in faults:
            # Only the first N requests asking for this exact fault get it (then: success).
            self.stats.faults_served[asked] += 1
            if self.stats.faults_served[asked] > int(faults["times"]):
                faults = {}
        if "status" in faults:
            status = int(faults["status"])
            headers = {"retry-after": faults["retry_after"]} if "retry_after" in faults else {}
            raise SimulatedError(status, self.error(status, f"Simulated failure {status}.").body, headers)
        if "huge" in faults:
            # A valid completion carrying about N megabytes, to test how big answers are relayed.
            padding = "x" * int(float(faults["huge"]) * 1024 * 1024)
            return _json({"id": "huge", "object": "chat.completion", "created": 0, "model": self.config.model,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": padding},
                                       "finish_reason": "stop", "logprobs": None}]})  # fmt: skip
        if "malformed" in faults:
            return Response(b'{"id": "broken", "choices": [', media_type="application/json")
        if request.method == "POST":
            with self.scheduler.serving():
                try:
                    return await self.generate(path, body, faults)
                except (TypeError, ValueError, KeyError, AttributeError, IndexError, orjson.JSONDecodeError):
                    # What a real server rejects as a bad request, not a crash.
                    raise self.error(400, "The request could not be processed.") from None
        return self.describe(path)

    async def _body(self, request: Request) -> Any:
        """The JSON body, or an audio route's form fields; a 400 for anything else."""
        raw = await request.body()
        try:
            if request.url.path in audio.ROUTES:
                return audio.form(raw, request.headers.get("content-type", ""))
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self.error(400, "Invalid JSON body.") from None
        except ValueError as exc:  # an audio upload that is not a form with a file
            raise self.error(400, str(exc)) from None

    def describe(self, path: str) -> Response:
        if path == "/v1/models":
            created = 1_700_000_000
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm" if self.vllm else "openai",
                    **(
                        {
                            "root": self.config.model,
                            "parent": None if name == self.config.model else self.config.model,
                            "max_model_len": 4096,
                        }
                        if self.vllm
                        else {}
                    ),
                }
                for name in self.models()
            ]
            return _json({"object": "list", "data": data})
        if path == "/version" and self.vllm:
            return _json({"version": self.config.vllm_version})
        if path == "/health":
            return Response(b"")
        if path == "/metrics":
            return Response(self.scheduler.metrics().encode(), media_type="text/plain")
        raise self.error(404, "Not Found")

    def _check(self, body: Any, known: frozenset[str]) -> None:
        if not isinstance(body, dict):
            raise self.error(400, "The body must be a JSON object.")
        if not self.vllm:
            for name in body:
                if name not in known:
                    raise self.error(400, f"Unrecognized request argument supplied: {name}")
        self._served(body.get("model"))

    def _served(self, model: object) -> None:
        if model not in self.models():
            raise self.error(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def generate(self, path: str, body: Any, faults: dict[str, str]) -> Response:
        if path == "/v1/chat/completions":
            self._check(body, OPENAI_CHAT_FIELDS)
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise self.error(400, "'messages' is required.", param="messages")
            return await self.complete(body, faults, chat=True)
        if path == "/v1/completions":
            self._check(body, OPENAI_COMPLETION_FIELDS)
            if "prompt" not in body:
                raise self.error(400, "'prompt' is required.", param="prompt")
            return await self.complete(body, faults, chat=False)
        if path == "/v1/embeddings":
            self._check(body, OPENAI_EMBEDDING_FIELDS)
            return self.embed(body)
        if path == "/v1/responses":
            self._check(body, OPENAI_RESPONSES_FIELDS)
            limit = self._bounded(body, "max_output_tokens", 16, MAX_MODEL_LEN)
            try:
                response = self.responses.create(body, limit)
            except Unknown:
                raise self._unknown_response(body["previous_response_id"], "previous_response_id") from None
            if body.get("stream"):
                return StreamingResponse(self.responses.events(response), media_type="text/event-stream")
            return _json(response)
        if path in audio.ROUTES:
            return await self.transcribe(audio.ROUTES[path], body, faults)
        if self.vllm:
            self._check(body, frozenset())
            if path == "/v1/messages":
                answer = messages.message(body)
                if body.get("stream"):
                    # reset_after=N: the stream stops after N events, without its message_stop.
                    stop = int(faults["reset_after"]) if "reset_after" in faults else None
                    events = itertools.islice(messages.events(answer), stop)
                    return StreamingResponse(events, media_type="text/event-stream")
                return _json(answer)
            if path == "/v1/messages/count_tokens":
                return _json(messages.count_tokens(body))
            if path == "/tokenize":
                return _json(native.tokenized(self.tokens(body)))
            if path in native.ROUTES:
                return _json(native.ROUTES[path](body))
            # Any other route naming a model: "the next endpoint vLLM adds", echoing what it got.
            return _json({"object": "echo", "path": path, "body": body})
        raise self.error(404, "Not Found")

    def _unknown_response(self, ident: object, param: str | None = None) -> SimulatedError:
        return self.error(404, f"Response with id '{ident}' not found.", param=param)

    async def stored_response(self, request: Request) -> Response:
        """Retrieve, delete or cancel a stored response, or list its input items."""
        self.stats.requests[request.url.path] += 1
        ident, _, action = request.path_params["rest"].partition("/")
        calls = {
            ("GET", ""): self.responses.get, ("DELETE", ""): self.responses.delete,
            ("POST", "cancel"): self.responses.cancel, ("GET", "input_items"): self.responses.input_items,
        }  # fmt: skip
        call = calls.get((request.method, action))
        if call is None:
            raise self.error(404, "Not Found")
        try:
            return _json(call(ident))
        except Unknown:
            raise self._unknown_response(ident) from None

    # Completions.

    def _constraint(self, body: dict[str, Any]) -> tuple[str, Any] | None:
        """The output constraint this backend would obey: (kind, spec)."""
        structured = body.get("structured_outputs") if self.vllm else None
        if self.honours_guided:
            structured = {kind: body[name] for name, kind in GUIDED_KEYS.items() if body.get(name) is not None}
        if isinstance(structured, dict):
            for kind in ("json", "choice", "regex", "grammar"):
                if structured.get(kind) is not None:
                    spec = structured[kind]
                    return kind, orjson.loads(spec) if kind == "json" and isinstance(spec, str) else spec
        response_format = body.get("response_format")
        if isinstance(response_format, dict):
            if response_format.get("type") == "json_schema":
                return "json", (response_format.get("json_schema") or {}).get("schema", {})
            if response_format.get("type") == "json_object":
                return "json", {"type": "object", "properties": {"answer": {"type": "string"}}}
        return None

    def _tool(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The tool to call, when the request forces one."""
        tools: list[dict[str, Any]] = body.get("tools") or []
        choice = body.get("tool_choice")
        if not tools or choice in (None, "none", "auto"):
            return None
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            return next((t for t in tools if (t.get("function") or {}).get("name") == wanted), None)
        return tools[0]

    def _choice(self, body: dict[str, Any], index: int, chat: bool) -> tuple[list[str], str, dict[str, Any] | None]:
        """(content tokens, finish_reason, tool call) for choice ``index``."""
        rng = generate.rng_for(body.get("messages") or body.get("prompt"), body.get("seed"), index)
        limit = (
            self._bounded(body, "max_completion_tokens", 16, MAX_MODEL_LEN)
            if "max_completion_tokens" in body
            else (self._bounded(body, "max_tokens", 16, MAX_MODEL_LEN))
        )
        tool = self._tool(body) if chat else None
        if tool is not None:
            function = tool.get("function") or {}
            arguments = generate.instance(function.get("parameters") or {}, rng)
            call = {
                "id": f"chatcmpl-tool-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}",
                "type": "function",
                "function": {"name": function.get("name", ""), "arguments": orjson.dumps(arguments).decode()},
            }
            return [], "tool_calls", call
        constraint = self._constraint(body)
        if constraint is not None:
            kind, spec = constraint
            if kind == "json":
                text = orjson.dumps(generate.instance(spec, rng)).decode()
            elif kind == "choice":
                text = str(spec[rng.randrange(len(spec))]) if spec else ""
            else:
                text = generate.text_tokens(rng, 1)[0][0]
            return [text[i : i + 4] for i in range(0, len(text), 4)] or [""], "stop", None
        tokens, finish = generate.text_tokens(rng, int(limit), to_limit=bool(body.get("ignore_eos")))
        return tokens, finish, None

    def _bounded(self, body: dict[str, Any], name: str, default: int, high: int, *, low: int = 1) -> int:
        """An integer parameter within what a small server accepts, else a 400 naming it."""
        value = body.get(name)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.error(400, f"'{name}' must be an integer from {low} to {high}.", param=name)
        return value

    def _logprobs(self, tokens: list[str], body: dict[str, Any], chat: bool) -> dict[str, Any] | None:
        if chat:
            if not body.get("logprobs"):
                return None
            top = self._bounded(body, "top_logprobs", 0, 20, low=0)
            return {
                "content": [
                    {
                        "token": token,
                        "logprob": -0.5,
                        "bytes": list(token.encode()),
                        "top_logprobs": [
                            {"token": token, "logprob": -0.5, "bytes": list(token.encode())} for _ in range(top)
                        ],
                    }
                    for token in tokens
                ],
                "refusal": None,
            }
        if body.get("logprobs") is None:
            return None
        return {
            "tokens": tokens,
            "token_logprobs": [-0.5] * len(tokens),
            "top_logprobs": [{token: -0.5} for token in tokens],
            "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))],
        }

    async def complete(self, body: dict[str, Any], faults: dict[str, str], *, chat: bool) -> Response:
        n = self._bounded(body, "n", 1, 16)
        choices = [self._choice(body, index, chat) for index in range(n)]
        prompt = body.get("messages") if chat else body.get("prompt")
        prompt_ids = self._prompt_ids(body)
        prompt_tokens = max(1, len(orjson.dumps(prompt)) // 4) if prompt_ids is None else len(prompt_ids)
        completion_tokens = sum(max(1, len(tokens)) for tokens, _, _ in choices)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body["model"]
        if body.get("stream"):
            events = self._events(ident, created, model, choices, usage, body, faults, prompt_ids, chat=chat)
            return StreamingResponse(events, media_type="text/event-stream")
        out = []
        for index, (tokens, finish, call) in enumerate(choices):
            text = "".join(tokens)
            if chat:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": None if call else text,
                    "refusal": None,
                    "tool_calls": [call] if call else [],
                    "reasoning_content": None,
                }
                out.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": self._logprobs(tokens, body, chat),
                        "finish_reason": finish,
                    }
                )
            else:
                out.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": self._logprobs(tokens, body, chat),
                        "finish_reason": finish,
                    }
                )
        async with self.scheduler.prefilled(model, prompt_ids) as cached:
            self._cached(usage, cached)
            await asyncio.sleep(float(faults.get("ttft", self.config.ttft)))
            return _json(
                {
                    "id": ident,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": out,
                    "usage": usage,
                    **(VLLM_EXTRAS if self.vllm else {}),
                }
            )

    def _prompt_ids(self, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids when the scheduler prefills (a prefix cache, or a cost per token), else None.

        None too for a prompt ``/tokenize`` refuses (a list of prompts, token ids): it is served as
        when nothing is modelled, neither cached nor queued.
        """
        if not self.scheduler.prefills:
            return None
        try:
            return self.tokens(body)
        except (TypeError, ValueError, KeyError):
            return None

    def _cached(self, usage: dict[str, Any], cached: int) -> None:
        if self.config.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}

    async def _events(
        self,
        ident: str,
        created: int,
        model: str,
        choices: list[tuple[list[str], str, dict[str, Any] | None]],
        usage: dict[str, Any],
        body: dict[str, Any],
        faults: dict[str, str],
        prompt_ids: list[int] | None,
        *,
        chat: bool,
    ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        ttft = float(faults.get("ttft", self.config.ttft))
        itl = float(faults.get("itl", self.config.itl))
        reset_after = int(faults["reset_after"]) if "reset_after" in faults else None
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        sent = 0

        def event(choice_list: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {"id": ident, "object": kind, "created": created, "model": model, "choices": choice_list, **extra}
            if include_usage:
                data.setdefault("usage", None)
            return b"data: " + orjson.dumps(data) + b"\n\n"

        def piece(
            index: int, token: str | None, finish: str | None, call: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            if not chat:
                return {"index": index, "text": token or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {}
            if token is not None:
                delta["content"] = token
            if call is not None:
                delta["tool_calls"] = [{"index": 0, **call}]
            out = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if token is not None and body.get("logprobs"):
                out["logprobs"] = self._logprobs([token], body, chat)
            return out

        try:
            with self.scheduler.serving():
                async with self.scheduler.prefilled(model, prompt_ids) as cached:
                    self._cached(usage, cached)
                    await asyncio.sleep(ttft)
                    if chat:
                        yield event(
                            [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                                for i in range(len(choices))
                            ]
                        )
                    longest = max(len(tokens) for tokens, _, _ in choices)
                    for position in range(longest):
                        if position:
                            await asyncio.sleep(itl)
                        if reset_after is not None and sent >= reset_after:
                            raise ConnectionResetError("simulated connection reset")
                        for index, (tokens, _, _) in enumerate(choices):
                            if position < len(tokens):
                                yield event([piece(index, tokens[position], None)])
                                sent += 1
                    for index, (_, finish, call) in enumerate(choices):
                        yield event([piece(index, None, finish, call)])
                    if include_usage:
                        yield event([], usage=usage)
                    if "no_done" not in faults:
                        yield b"data: [DONE]\n\n"
                    self.stats.streams_completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.streams_aborted += 1
            raise

    # Speech to text.

    async def transcribe(self, task: str, fields: audio.Form, faults: dict[str, str]) -> Response:
        if self.vllm:
            fields.setdefault("model", self.config.model)  # vLLM serves its one model when none is named
        elif "model" not in fields:
            raise self.error(400, "you must provide a model parameter", param="model")
        self._served(fields["model"])
        try:
            if audio.streams(task, fields, vllm=self.vllm):
                frames = audio.events(task, fields, vllm=self.vllm)
                return StreamingResponse(self._paced(frames, faults), media_type="text/event-stream")
            content, media_type = audio.answer(task, fields, vllm=self.vllm)
        except ValueError as exc:
            raise self.error(400, str(exc)) from None
        await asyncio.sleep(float(faults.get("ttft", self.config.ttft)))
        return Response(content, media_type=media_type)

    async def _paced(self, frames: Sequence[bytes], faults: dict[str, str]) -> AsyncIterator[bytes]:
        """``frames`` at the configured pace, with the stream faults; ``no_done`` withholds the last frame."""
        itl = float(faults.get("itl", self.config.itl))
        reset_after = int(faults["reset_after"]) if "reset_after" in faults else None
        try:
            await asyncio.sleep(float(faults.get("ttft", self.config.ttft)))
            for sent, frame in enumerate(frames[:-1] if "no_done" in faults else frames):
                if sent:
                    await asyncio.sleep(itl)
                if reset_after is not None and sent >= reset_after:
                    raise ConnectionResetError("simulated connection reset")
                yield frame
            self.stats.streams_completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.streams_aborted += 1
            raise

    # Embeddings.

    def embed(self, body: dict[str, Any]) -> Response:
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise self.error(400, "'input' must be a string or a non-empty list.", param="input")
        dimensions = self._bounded(body, "dimensions", self.config.dimensions, 4096)
        if len(inputs) > 2048:
            raise self.error(400, "At most 2048 inputs.", param="input")
        base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = generate.embedding(orjson.dumps(item).decode(), dimensions)
            data.append(
                {"object": "embedding", "index": index, "embedding": generate.as_base64(vector) if base64 else vector}
            )
        tokens = sum(max(1, len(orjson.dumps(item)) // 4) for item in inputs)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # Test hooks.

    async def stats_view(self, request: Request) -> Response:
        return Response(self.stats.as_json(**self.scheduler.stats()), media_type="application/json")

    async def kv_hooks(self, request: Request) -> Response:
        """``{"drop": N}`` and ``{"silent": bool}``: what the PUB socket withholds (``Scheduler.steer``)."""
        if self.scheduler.publisher is None:
            raise self.error(404, "KV events are not published: no kv_events endpoint.")
        body = await self._body(request)
        drop = body.get("drop") if isinstance(body, dict) else None
        silent = body.get("silent") if isinstance(body, dict) else None
        if drop is not None and (not isinstance(drop, int) or isinstance(drop, bool) or drop < 0):
            raise self.error(400, "'drop' must be a count of batches.", param="drop")
        if silent is not None and not isinstance(silent, bool):
            raise self.error(400, "'silent' must be true or false.", param="silent")
        return _json(self.scheduler.steer(drop=drop, silent=silent))

    async def reset_prefix_cache(self, request: Request) -> Response:
        """vLLM's ``POST /reset_prefix_cache``: ``{"success": false}`` while running requests hold blocks.

        ``?reset_running_requests=true`` resets anyway, as vLLM's does.
        """
        self.stats.requests[request.url.path] += 1
        if not self.vllm:
            raise self.error(404, "Not Found")
        force = request.query_params.get("reset_running_requests", "").lower() in ("1", "true", "yes", "on")
        return _json({"success": self.scheduler.reset_prefix_cache(force=force)})

    async def reset(self, request: Request) -> Response:
        self.stats = Stats()
        return Response(b"{}", media_type="application/json")


def create_simulator(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app."""
    simulator = Simulator(config or SimulatorConfig())
    served = [
        Route("/v1/chat/completions", simulator.handle, methods=["POST"]),
        Route("/v1/completions", simulator.handle, methods=["POST"]),
        Route("/v1/embeddings", simulator.handle, methods=["POST"]),
        Route("/v1/responses", simulator.handle, methods=["POST"]),
        Route("/v1/responses/{rest:path}", simulator.stored_response, methods=["GET", "POST", "DELETE"]),
        *(Route(path, simulator.handle, methods=["POST"]) for path in native.ROUTES),
        *(Route(path, simulator.handle, methods=["POST"]) for path in audio.ROUTES),
        Route("/v1/models", simulator.handle, methods=["GET"]),
        Route("/version", simulator.handle, methods=["GET"]),
        Route("/health", simulator.handle, methods=["GET"]),
        Route("/metrics", simulator.handle, methods=["GET"]),
        Route("/_sim/stats", simulator.stats_view, methods=["GET"]),
        Route("/_sim/reset", simulator.reset, methods=["POST"]),
        Route("/_sim/kv", simulator.kv_hooks, methods=["POST"]),
        Route("/reset_prefix_cache", simulator.reset_prefix_cache, methods=["POST"]),
        Route("/v1/{rest:path}", simulator.handle, methods=["POST"]),
    ]
    return Starlette(
        routes=served,
        exception_handlers={SimulatedError: _answer_error},
        lifespan=lambda app: simulator.scheduler.publishing(),
    )
