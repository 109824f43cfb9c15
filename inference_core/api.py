"""The HTTP surface: ``create_app(settings)`` wires settings, engine and routes into one ASGI app.

Routes only parse and check the request, hand a ``Call`` to the engine, and shape its answer.
``app`` is built on first use from the environment, so ``uvicorn inference_core.api:app`` works.
"""

from __future__ import annotations

import asyncio
import gc
import math
import sys
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message

from inference_core import endpoints, multipart, openapi, protocol
from inference_core.auth import GatewayKeys, parse_keys, tenant_of
from inference_core.batch.batches import Batches, Deferred, shown
from inference_core.batch.database import open_database
from inference_core.batch.store import FileStore, StoredFile
from inference_core.config import ConfigError, RedisFailure, Settings, load_settings, warn_unknown_variables
from inference_core.config_file import BackendConfig, FleetConfig, load_fleet
from inference_core.endpoints import Endpoint
from inference_core.engine import Admission, Backend, Call, Engine, Fleet, KeyGate, RateLimiter, RetryPolicy
from inference_core.engine.affinity import AffinityStore, ResponseAffinity
from inference_core.engine.backend import model_entries
from inference_core.engine.call import Outcome
from inference_core.engine.shared import Shared, SharedAffinity, SharedRateLimiter, SharedSlots, SharedWindows
from inference_core.engine.tenants import Slots, SlotStore, Tenant, Windows, WindowStore, build_keys
from inference_core.errors import (
    ClientDisconnected,
    Draining,
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimitExceeded,
    RequestTimeout,
    anthropic_type,
)
from inference_core.health import STALE_AFTER_INTERVALS, HealthMonitor
from inference_core.observability import Metrics, RequestContext, configure_logging, record_of
from inference_core.observability.logs import server_logs_access
from inference_core.reload import Reloader
from inference_core.responses import EventStreamResponse, JSONBytes, unless_disconnected
from inference_core.routing import Handler, Lifespan, Route, Router
from inference_core.tracing import Tracer, tracer_from_environment

#: Room for an upload's form fields and boundaries beyond the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024
#: A request header: at most this many gateway retries for this request (never more than configured).
MAX_RETRIES_HEADER = "x-inference-max-retries"
#: Methods whose unknown ``/v1`` paths answer 404 (only a POST naming a model is passed through).
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # HEAD: as GET, for every route


async def read_body(request: Request, limit: int, within: float) -> bytes:
    """The request body.

    At most ``limit`` bytes are read, and they must all arrive within ``within`` seconds: a
    client trickling its body (slowloris) gets 408 instead of holding a connection forever.
    A body that came whole with its headers (the usual case) needs no timer.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    message = await request.receive()
    raw: bytes = message.get("body", b"")
    if message.get("more_body"):
        chunks = [raw]
        size = len(raw)
        try:
            async with asyncio.timeout(within):
                while message.get("more_body"):
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected("The client disconnected.")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeout(f"The request body did not arrive within {within:g}s.") from None
        raw = b"".join(chunks)
    elif len(raw) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    return raw


async def read_json(request: Request, limit: int, within: float) -> tuple[Any, bytes]:
    """The request body, parsed, and its raw bytes."""
    raw = await read_body(request, limit, within)
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None


class Routes:
    """The endpoints, bound to one engine."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        health: HealthMonitor,
        files: FileStore,
        batches: Batches,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.health_monitor = health
        self.files = files
        self.batches = batches

    def _forwarder(self, endpoint: Endpoint) -> Handler:
        async def forward(request: Request) -> ASGIApp:
            if endpoint.form:
                payload, raw = await self._read_form(request)
                return await self._forward(request, endpoint, payload, raw, request.headers["content-type"])
            payload, raw = await read_json(request, self.settings.max_body_bytes, self.settings.timeout)
            protocol.check(endpoint.schema, payload)
            return await self._forward(request, endpoint, payload, raw)

        return forward

    async def _read_form(self, request: Request) -> tuple[dict[str, Any], bytes]:
        """An upload's ``model`` and ``stream`` fields, and its bytes, to be relayed as they are."""
        boundary = multipart.boundary(request.headers.get("content-type", ""))
        if boundary is None:
            raise InvalidRequest("The request body must be multipart/form-data.")
        raw = await read_body(request, self.settings.max_body_bytes, self.settings.timeout)
        model = multipart.read_field(raw, boundary, "model")
        if not model:
            raise InvalidRequest("The form needs one 'model' field.", param="model")
        return {"model": model, "stream": multipart.read_field(raw, boundary, "stream") == "true"}, raw

    async def _forward(
        self, request: Request, endpoint: Endpoint, payload: Any, raw: bytes, content_type: str = "application/json"
    ) -> ASGIApp:
        record = record_of(request.scope)
        tenant = tenant_of(request.scope)
        priority, sent = _priority(payload, request, tenant)
        previous = payload.get("previous_response_id") if endpoint.stores_responses else None
        call = Call(
            endpoint,
            sent,
            record.request_id,
            raw if sent is payload else None,
            priority,
            _max_retries(request),
            previous,
            content_type,
            tenant,
        )
        record.model = self._model_of(payload)
        record.outcome = call.outcome
        if endpoint.streams and payload.get("stream"):
            record.stream = True
            stream = await unless_disconnected(request.receive, self.engine.stream(call))
            return EventStreamResponse(stream, record, self.metrics, anthropic=endpoint.anthropic)
        reply = await unless_disconnected(request.receive, self.engine.complete(call))
        return JSONBytes(reply.body, reply.status, reply.headers)

    async def stored_response(self, request: Request) -> ASGIApp:
        """Retrieve, delete or cancel a stored response, or list its input items, where it is stored."""
        endpoint, response_id = endpoints.stored_response(request.method, request.path_params["response_id"])
        record = record_of(request.scope)
        tenant = tenant_of(request.scope)
        priority, _ = _priority({}, request, tenant)
        call = Call(endpoint, {}, record.request_id, None, priority, _max_retries(request), response_id, tenant=tenant)
        record.outcome = call.outcome
        reply = await unless_disconnected(request.receive, self.engine.complete(call))
        return JSONBytes(reply.body, reply.status, reply.headers)

    async def passthrough(self, request: Request) -> ASGIApp:
        """Any other ``POST /v1/...`` whose body names a model goes to the backend's same path."""
        unknown = NotFound(f"Invalid URL ({request.method} {request.url.path}).")
        if request.method != "POST":
            raise unknown
        endpoint = endpoints.passthrough(request.url.path)
        payload, raw = await read_json(request, self.settings.max_body_bytes, self.settings.timeout)
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
            raise unknown
        protocol.check(endpoint.schema, payload)
        return await self._forward(request, endpoint, payload, raw)

    async def batch(self, request: Request) -> ASGIApp:
        """Many chat requests in, one result each out, in order; one failure fails only itself."""
        items, _ = await read_json(request, self.settings.max_body_bytes, self.settings.timeout)
        if not isinstance(items, list):
            raise InvalidRequest("The request body must be a JSON list of chat completion requests.")
        if len(items) > self.settings.max_batch_size:
            raise InvalidRequest(f"A batch holds at most {self.settings.max_batch_size} requests.")
        record = record_of(request.scope)
        tenant = tenant_of(request.scope)
        retries = _max_retries(request)
        outcomes = [Outcome() for _ in items]
        answers = asyncio.gather(
            *(
                self._batch_item(item, outcome, f"{record.request_id}-{i}", request, tenant, retries)
                for i, (item, outcome) in enumerate(zip(items, outcomes, strict=True))
            )
        )
        try:
            results = await unless_disconnected(request.receive, answers)
        finally:  # what the entries used counts, whether or not the client stayed for it
            record.entries = tuple(zip(map(self._model_of, items), outcomes, strict=True))
            record.outcome = Outcome.summed(outcomes)
        return JSONBytes(b'{"results":[' + b",".join(results) + b"]}")

    def _model_of(self, payload: object) -> str:
        """The model a request body asks for: its own, else the default."""
        named = payload.get("model") if isinstance(payload, dict) else None
        return named if isinstance(named, str) and named else self.settings.model

    async def _batch_item(
        self,
        item: object,
        outcome: Outcome,
        request_id: str,
        request: Request,
        tenant: Tenant | None,
        max_retries: int | None,
    ) -> bytes:
        try:
            protocol.check(protocol.ChatCompletionRequest, item)
            assert isinstance(item, dict)
            if item.get("stream"):
                raise InvalidRequest("Streaming is not available in a batch.", param="stream")
            priority, item = _priority(item, request, tenant)
            call = Call(
                endpoints.CHAT,
                item,
                request_id,
                priority=priority,
                max_retries=max_retries,
                tenant=tenant,
                outcome=outcome,
            )
            return (await self.engine.complete(call)).body
        except GatewayError as exc:
            return exc.body()

    async def models(self, request: Request) -> ASGIApp:
        listed = await self.engine.models(record_of(request.scope).request_id)
        tenant = tenant_of(request.scope)
        if tenant is None or tenant.config.models is None:
            return JSONBytes(listed)
        allowed = [entry for entry in model_entries(listed) if tenant.allows(entry["id"])]
        return JSONBytes(orjson.dumps({"object": "list", "data": allowed}))

    async def model(self, request: Request) -> ASGIApp:
        model_id = request.path_params["model_id"]
        tenant = tenant_of(request.scope)
        if tenant is not None and not tenant.allows(model_id):
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
        return JSONBytes(await self.engine.model(model_id, record_of(request.scope).request_id))

    async def usage(self, request: Request) -> ASGIApp:
        """The calling key's limits and usage (an ``admin`` key's: every key's)."""
        tenant = tenant_of(request.scope)
        keys = self.engine.fleet.keys
        if tenant is None or keys is None:
            raise NotFound("The gateway has no keys, so no usage per key.")
        shown = keys.tenants.values() if tenant.config.admin else (tenant,)
        reports = [await self.engine.gate.windows.usage(t) for t in shown]
        return JSONBytes(orjson.dumps({"object": "list", "data": reports}))

    # OpenAI's Files API: what a batch reads, kept by the gateway itself.

    async def file_collection(self, request: Request) -> ASGIApp:
        """``POST /v1/files`` uploads a file; ``GET /v1/files`` lists the caller's."""
        owner = _owner(request)
        if request.method == "POST":
            return JSONBytes(orjson.dumps((await self._upload(request, owner)).openai()))
        query = request.query_params
        limit = _bounded_int(query.get("limit"), "limit", default=10000, low=1, high=10000)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("'order' is asc or desc.", param="order")
        page = await self.files.page(
            owner, purpose=query.get("purpose"), after=query.get("after"), limit=limit + 1, newest_first=order == "desc"
        )
        data = [stored.openai() for stored in page[:limit]]
        listed = {"object": "list", "data": data, "has_more": len(page) > limit}
        listed |= {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
        return JSONBytes(orjson.dumps(listed))

    async def _upload(self, request: Request, owner: str | None) -> StoredFile:
        """The upload, spooled to disk as it arrives (never whole in memory), within the size limit."""
        limit = self.settings.batch_max_file_bytes
        too_large = PayloadTooLarge(f"The file exceeds the limit of {limit} bytes.")
        allowed = limit + FORM_OVERHEAD_BYTES  # the form's own fields and boundaries
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > allowed:
            raise too_large
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > allowed:
                raise too_large
            return message

        try:
            form = await Request(request.scope, counted).form(max_files=1, max_fields=16)
        except MultiPartException as exc:
            raise InvalidRequest(f"The upload is not a valid multipart form: {exc.message}") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("The form needs a 'file' part holding the file.", param="file")
            if purpose != "batch":
                raise InvalidRequest("'purpose' must be 'batch' (the files the Batch API reads).", param="purpose")
            stored = await self.files.add(upload.file, owner=owner, purpose=purpose, filename=upload.filename or "")
        finally:
            await form.close()
        if stored.bytes > limit:
            await self.files.delete(stored.id, owner)
            raise too_large
        return stored

    async def file_item(self, request: Request) -> ASGIApp:
        """``GET``/``DELETE /v1/files/{id}`` and ``GET /v1/files/{id}/content``, for the file's owner only."""
        file_id, action = _item(request, "file_path", {"": ("GET", "DELETE"), "/content": ("GET",)})
        owner = _owner(request)
        missing = NotFound(f"No file with id '{file_id}' exists.", param="file_id")
        if request.method == "DELETE":
            if not await self.files.delete(file_id, owner):
                raise missing
            return JSONBytes(orjson.dumps({"id": file_id, "object": "file", "deleted": True}))
        stored = await self.files.get(file_id, owner)
        if stored is None:
            raise missing
        if action == "content":
            content, length = self.files.content(file_id), {"content-length": str(stored.bytes)}
            return StreamingResponse(content, media_type="application/octet-stream", headers=length)
        return JSONBytes(orjson.dumps(stored.openai()))

    # OpenAI's Batch API.

    async def batch_collection(self, request: Request) -> ASGIApp:
        """``POST /v1/batches`` creates a batch; ``GET /v1/batches`` lists the caller's, newest first."""
        owner = _owner(request)
        if request.method == "POST":
            body, _ = await read_json(request, self.settings.max_body_bytes, self.settings.timeout)
            if not isinstance(body, dict):
                raise InvalidRequest("The request body must be a JSON object.")
            for name in ("input_file_id", "endpoint", "completion_window"):
                if not isinstance(body.get(name), str):
                    raise InvalidRequest(f"'{name}' is required.", param=name)
            created = await self.batches.create(
                owner=owner,
                input_file_id=body["input_file_id"],
                endpoint=body["endpoint"],
                completion_window=body["completion_window"],
                metadata=body.get("metadata"),
            )
            return JSONBytes(orjson.dumps(shown(created)))
        query = request.query_params
        limit = _bounded_int(query.get("limit"), "limit", default=20, low=1, high=100)
        page = await self.batches.page(owner, after=query.get("after"), limit=limit + 1)
        data = [shown(record) for record in page[:limit]]
        listed = {"object": "list", "data": data, "has_more": len(page) > limit}
        listed |= {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
        return JSONBytes(orjson.dumps(listed))

    async def batch_item(self, request: Request) -> ASGIApp:
        """``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``, for the batch's owner only."""
        batch_id, action = _item(request, "batch_path", {"": ("GET",), "/cancel": ("POST",)})
        owner = _owner(request)
        found = await (self.batches.cancel if action else self.batches.get)(batch_id, owner)
        if found is None:
            raise NotFound(f"No batch with id '{batch_id}' exists.", param="batch_id")
        return JSONBytes(orjson.dumps(shown(found)))

    async def health(self, request: Request) -> ASGIApp:
        return JSONBytes(orjson.dumps(self.health_monitor.report()))

    async def live(self, request: Request) -> ASGIApp:
        return JSONBytes(b'{"status":"ok"}')

    async def ready(self, request: Request) -> ASGIApp:
        ok, reason = self.health_monitor.ready()
        return JSONBytes(
            orjson.dumps({"status": "ready" if ok else "unavailable", "reason": reason}), 200 if ok else 503
        )

    async def metrics_text(self, request: Request) -> ASGIApp:
        return Response(generate_latest(self.metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    async def openapi_json(self, request: Request) -> ASGIApp:
        return JSONBytes(openapi.document())

    async def docs(self, request: Request) -> ASGIApp:
        return HTMLResponse(openapi.SWAGGER_PAGE)

    async def docs_asset(self, request: Request) -> ASGIApp:
        return FileResponse(openapi.swagger_asset(request.url.path.rsplit("/", 1)[1]))

    def table(self) -> list[Route]:
        return [
            *(Route(endpoint.path, {"POST": self._forwarder(endpoint)}) for endpoint in endpoints.FORWARDED),
            Route("/v1/models", {"GET": self.models}),
            Route("/v1/models/{model_id:path}", {"GET": self.model}),
            Route("/v1/batch/chat/completions", {"POST": self.batch}),
            Route("/v1/usage", {"GET": self.usage}),
            Route("/health", {"GET": self.health}),
            Route("/health/live", {"GET": self.live}),
            Route("/health/ready", {"GET": self.ready}),
            Route("/metrics", {"GET": self.metrics_text}),
            Route("/openapi.json", {"GET": self.openapi_json}),
            Route("/docs", {"GET": self.docs}),
            *(Route(f"/docs/{name}", {"GET": self.docs_asset}) for name in openapi.SWAGGER_ASSETS),
            Route("/v1/files", {"GET": self.file_collection, "POST": self.file_collection}),
            Route("/v1/files/{file_path:path}", dict.fromkeys(_METHODS, self.file_item)),
            Route("/v1/batches", {"GET": self.batch_collection, "POST": self.batch_collection}),
            Route("/v1/batches/{batch_path:path}", dict.fromkeys(_METHODS, self.batch_item)),
            Route(endpoints.RESPONSE_ROUTE, dict.fromkeys(_METHODS, self.stored_response)),
            Route(endpoints.PASSTHROUGH_ROUTE, dict.fromkeys(_METHODS, self.passthrough)),
        ]


def gateway_error(request: Request, exc: GatewayError) -> ASGIApp:
    record = record_of(request.scope)
    if isinstance(exc, RateLimitExceeded):
        record.rejection = "rpm" if exc.kind == "requests" else "tpm"
    elif isinstance(exc, ModelNotAllowed | Overloaded):
        record.rejection = exc.code
    record.client_left = isinstance(exc, ClientDisconnected)
    headers = exc.headers
    if not exc.client_may_retry:
        headers = {**headers, "x-should-retry": "false"}
    route = request.scope.get("route")
    anthropic = route is not None and route.path in endpoints.ANTHROPIC_PATHS
    record.error = anthropic_type(exc.status) if anthropic else exc.label
    body = exc.anthropic_body(record.request_id) if anthropic else exc.body()
    return JSONBytes(body, exc.status, headers)


def _priority(payload: dict[str, Any], request: Request, tenant: Tenant | None) -> tuple[int, dict[str, Any]]:
    """The request's priority, and its payload carrying it (the same object when unchanged).

    Asked for by the body's ``priority`` (vLLM's convention: lower is sooner), else ``X-Priority``,
    else 0; with a key, never sooner than the key's own priority, and a body's ``priority`` is
    rewritten to what it runs at, so the backend's scheduler sees the same.
    """
    value = payload.get("priority")
    if value is not None:
        asked: int | None = int(value)
    else:
        header = request.headers.get("x-priority")
        try:
            asked = None if header is None else int(header)
        except ValueError:
            raise InvalidRequest("The X-Priority header must be an integer.", param="X-Priority") from None
    if tenant is None:
        return asked or 0, payload
    priority = tenant.priority(asked)
    if value is not None and priority != value:
        return priority, {**payload, "priority": priority}
    return priority, payload


def _item(request: Request, parameter: str, actions: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    """The id and the action in ``.../{id}`` or ``.../{id}/action``, for a method the action allows.

    ``actions`` maps ``""`` or ``"/action"`` to its methods; any other path is 404, another method
    405 with its ``Allow``.
    """
    item, slash, action = request.path_params[parameter].partition("/")
    allowed = actions.get(slash + action)
    if allowed is None:
        raise NotFound(f"Invalid URL ({request.method} {request.url.path}).")
    if request.method not in allowed:
        refused = MethodNotAllowed(f"Method not allowed ({request.method} {request.url.path}).")
        refused.headers["allow"] = ", ".join(allowed)
        raise refused
    return item, action


def _owner(request: Request) -> str | None:
    """Whose files a request sees: its key's (None: the gateway has no keys)."""
    tenant = tenant_of(request.scope)
    return tenant.name if tenant is not None else None


def _bounded_int(value: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise InvalidRequest(f"'{name}' must be a whole number from {low} to {high}.", param=name)
    return int(value)


def _max_retries(request: Request) -> int | None:
    """The gateway retries a client asked for with ``x-inference-max-retries`` (capped by the engine)."""
    header = request.headers.get(MAX_RETRIES_HEADER)
    if header is None:
        return None
    if not (header.isascii() and header.isdigit()):
        raise InvalidRequest(
            f"The {MAX_RETRIES_HEADER} header must be a whole number of retries.", param=MAX_RETRIES_HEADER
        )
    return int(header)


def fleet_builder(
    settings: Settings, admission: Admission, shared: Shared | None
) -> Callable[[FleetConfig, Fleet | None], Fleet]:
    """Builds the fleet of a configuration; a backend whose block is unchanged is kept as it is."""

    def rate_limiter(name: str, block: BackendConfig) -> RateLimiter | None:
        rps = block.rate_limit_rps
        if not rps:
            return None
        burst = block.rate_limit_burst or math.ceil(rps)
        return RateLimiter(rps, burst) if shared is None else SharedRateLimiter(shared, name, rps, burst)

    def build(config: FleetConfig, previous: Fleet | None) -> Fleet:
        flat_keys = parse_keys(settings.gateway_api_keys.get_secret_value()) if settings.gateway_api_keys else ()
        backends = {}
        for name, block in config.backends.items():
            kept = previous.backends.get(name) if previous is not None else None
            if kept is not None and kept.config == block:
                backends[name] = kept
                continue
            try:
                backends[name] = Backend(
                    name,
                    block,
                    lane=admission.lane(name, block.max_concurrent_tasks),
                    rate_limiter=rate_limiter(name, block),
                    idle_connections=settings.max_connections,
                    eject_after=settings.eject_after,
                    stale_after=STALE_AFTER_INTERVALS * settings.probe_interval,
                    drop_unsupported=settings.drop_unsupported_params,
                    kv_load_slack=settings.kv_load_slack,
                    kv_events_silence=settings.kv_events_silence,
                    kv_index_blocks=settings.kv_index_blocks,
                )
            except ValueError as exc:  # its tokenizer directory
                where = f"backends.{name}.tokenizer" if settings.config else "INFERENCE_TOKENIZER"
                raise ConfigError(f"{where}: {exc}") from None
        aliases = {name: (alias.target, *alias.fallbacks) for name, alias in config.models.items()}
        keys = build_keys(config.keys, flat_keys, previous.keys if previous is not None else None)
        return Fleet(backends, aliases, config.default_model, keys)

    return build


def create_app(settings: Settings, *, tracer: Tracer | None = None) -> Lifespan:
    """The gateway for ``settings``: the one place concrete classes are chosen and wired.

    ``tracer`` defaults to what the ``OTEL_*`` variables ask for (usually: no tracing).
    """
    tracer = tracer_from_environment() if tracer is None else tracer
    metrics = Metrics(configured_model=settings.model)
    admission = Admission(
        max_in_flight=settings.max_concurrent_tasks,
        queue_size=settings.queue_size,
        queue_timeout=settings.queue_timeout,
    )
    shared = None
    windows: WindowStore = Windows(settings.limit_window)
    slots: SlotStore = Slots()
    affinity: AffinityStore = ResponseAffinity(settings.response_affinity_size)
    if settings.redis_url is not None:
        fail_open = settings.redis_failure is RedisFailure.OPEN
        shared = store = Shared(settings.redis_url.get_secret_value(), fail_open=fail_open)
        windows = SharedWindows(store, settings.limit_window)
        slots = SharedSlots(store)
        affinity = SharedAffinity(store, ResponseAffinity(settings.response_affinity_size))
        metrics.watch_redis(lambda: store.up)
    build = fleet_builder(settings, admission, shared)
    engine = Engine(
        build(load_fleet(settings), None),
        admission=admission,
        retry_policy=RetryPolicy(
            max_retries=settings.max_retries,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
        ),
        affinity=affinity,
        gate=KeyGate(
            windows,
            slots,
            queue_timeout=settings.queue_timeout,
            default_completion_tokens=settings.default_completion_tokens,
        ),
        on_retry=metrics.retried,
        on_fallback=metrics.fell_back,
        tracer=tracer,
    )
    metrics.watch(admission, lambda: engine.fleet)
    health = HealthMonitor(engine, metrics, interval=settings.probe_interval, shutdown_grace=settings.shutdown_grace)
    reloader = Reloader(engine, health, load=lambda: load_fleet(settings), build=build)
    database = open_database(
        settings.database_url.get_secret_value() if settings.database_url else None, settings.data_dir
    )
    files = FileStore(database, settings.data_dir)

    async def run_line(
        endpoint: Endpoint, payload: dict[str, Any], raw: bytes, request_id: str, owner: str | None
    ) -> tuple[int, bytes]:
        """One batch line through the engine, at the batch priority, under its owner's key and limits."""
        keys = engine.fleet.keys
        tenant = keys.tenants.get(owner) if keys is not None and owner is not None else None
        try:
            if owner is not None and tenant is None:
                raise InvalidApiKey(f"The key '{owner}' that created this batch is no longer accepted.")
            priority = max(settings.batch_priority, tenant.config.priority) if tenant else settings.batch_priority
            call = Call(endpoint, payload, request_id, raw, priority, tenant=tenant)
            return 200, (await engine.complete(call)).body
        except Draining:
            raise  # not the line's answer: the gateway is stopping, and the line runs after the restart
        except RateLimitExceeded as error:
            raise Deferred(int(error.headers["retry-after-ms"]) / 1000) from None  # the key's window: wait it out
        except Overloaded as error:
            raise Deferred(float(error.headers["retry-after"])) from None  # no room yet: batch work waits
        except GatewayError as error:
            return error.status, error.body()

    batches = Batches(
        files,
        endpoints={
            e.path: e for e in (endpoints.CHAT, endpoints.COMPLETIONS, endpoints.EMBEDDINGS, endpoints.RESPONSES)
        },
        run_line=run_line,
        routable=lambda model: engine.fleet.serves(model),
        max_lines=settings.batch_max_lines,
        max_concurrent=settings.batch_max_concurrent,
        window=settings.batch_window_seconds,
    )
    batches.on_line = metrics.batch_line
    metrics.watch_batches(lambda: batches.running)
    health.batches = lambda: batches.running
    routes = Routes(settings, engine, metrics, health, files, batches)

    async def startup() -> None:
        for backend in engine.fleet.backends.values():
            await backend.start()
        await health.start()
        if settings.config is not None:
            reloader.watch()
        await batches.start()

    async def shutdown() -> None:
        await health.stop()
        await reloader.stop()
        if shared is not None:
            await shared.aclose()
        await batches.aclose(grace=settings.shutdown_grace)
        database.close()
        for backend in engine.fleet.backends.values():
            await backend.aclose()

    app: ASGIApp = Router(routes.table(), on_error=gateway_error)
    app = GatewayKeys(app, keys=lambda: engine.fleet.keys)
    if settings.cors_origins:
        origins = [origin.strip() for origin in settings.cors_origins.split(",")]
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    return Lifespan(
        RequestContext(app, metrics=metrics, tracer=tracer, access_log=settings.access_log), startup, shutdown
    )


def ready_app(**overrides: object) -> tuple[Settings, Lifespan]:
    """The settings (the environment's, ``overrides`` on top) and their app, the process ready to serve it.

    Logging is set up, mistyped variables are named and the garbage collector is tuned; a bad
    setting stops the process with one line and status 2.
    """
    try:
        settings = load_settings(**overrides)
        application = create_app(settings)
    except ConfigError as exc:
        print(f"inference-core: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    warn_unknown_variables()
    tune_garbage_collector()
    return settings, application


def tune_garbage_collector() -> None:
    """Collect cycles every 50,000 allocations, not 700, and never scan what start-up built.

    A request allocates a few hundred objects, so the default threshold ran the collector every
    few requests: 7% of the CPU at 64 concurrent requests (measured with gc.callbacks), for
    almost no garbage, since the request path makes few cycles.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def __getattr__(name: str) -> Lifespan:
    """``app``, built from the environment when a server first asks for it (not at import)."""
    if name != "app":
        raise AttributeError(name)
    # uvicorn's --no-access-log (or gunicorn's access log left off) turns the gateway's line off too.
    _, application = ready_app(**({} if server_logs_access() else {"access_log": False}))
    globals()["app"] = application
    return application


__all__ = ["create_app"]
