"""The request path below the routes: route, admit, limit, translate, send, retry, fall back.

Routes hand the engine a ``Call``; it returns a ``Reply`` (a whole body) or a ``Stream`` (SSE
frames). Failures are raised as ``GatewayError``s carrying the headers the client should see.
Nothing here knows about HTTP frameworks, and nothing here knows a backend's quirks: those
belong to the provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import orjson

from inference_core import multipart, sse
from inference_core.endpoints import Endpoint
from inference_core.engine import retry
from inference_core.engine.admission import Admission
from inference_core.engine.affinity import AffinityStore
from inference_core.engine.backend import Backend, model_entries, model_entry, upstream_error
from inference_core.engine.fleet import Destination, Fleet
from inference_core.engine.replicas import Replica
from inference_core.engine.tenants import Quota, Slot, SlotStore, Tenant, WindowStore, estimate
from inference_core.errors import (
    BadUpstreamResponse,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    QueueTimeout,
    ResponseNotFound,
    UpstreamStatusError,
)
from inference_core.providers.base import Payload
from inference_core.tracing import NO_TRACER, AttributeValue, Span, Tracer
from inference_core.upstream import UpstreamResponse

DROPPED_PARAMS_HEADER = "x-inference-dropped-params"
QUEUE_MS_HEADER = "x-inference-queue-ms"
RETRIES_HEADER = "x-inference-retries"
BACKEND_HEADER = "x-inference-backend"
FALLBACKS_HEADER = "x-inference-fallbacks"

log = logging.getLogger("inference_core")
T = TypeVar("T")
_REQUEST_ATTRIBUTES = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
)


@dataclass(slots=True)
class Outcome:
    """What happened to one call, filled in by the engine, read by headers, logs, metrics and spans."""

    queued: float = 0.0
    #: Of ``queued``, the seconds spent waiting for the rate limit.
    rate_limited: float = 0.0
    retries: int = 0
    #: Seconds slept between attempts.
    backoff: float = 0.0
    #: Seconds spent waiting on the backend, over all attempts (to headers, or whole body).
    upstream: float = 0.0
    #: One (backend, kind) per failed attempt; kind is connect, timeout, bad_response or the HTTP status.
    upstream_errors: list[tuple[str, str]] = field(default_factory=list)
    #: The backend that answered (or failed last).
    backend: str | None = None
    #: Targets of the model passed over before ``backend``.
    fallbacks: int = 0
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Stream events relayed (counted only where a key's token limit needs them).
    events: int = 0

    def headers(self) -> dict[str, str]:
        headers = {QUEUE_MS_HEADER: f"{self.queued * 1000:.1f}", RETRIES_HEADER: str(self.retries)}
        if self.backend is not None:
            headers[BACKEND_HEADER] = self.backend
            headers[FALLBACKS_HEADER] = str(self.fallbacks)
        return headers

    def count_usage(self, usage: object) -> None:
        """Chat and completions say prompt/completion tokens; the Responses API says input/output."""
        if isinstance(usage, dict):
            self.prompt_tokens = _int_or_none(usage.get("prompt_tokens", usage.get("input_tokens")))
            self.completion_tokens = _int_or_none(usage.get("completion_tokens", usage.get("output_tokens")))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Call:
    """One operation to perform; ``raw`` is the client's body, forwarded when unchanged."""

    endpoint: Endpoint
    payload: Payload
    request_id: str
    raw: bytes | None = None
    priority: int = 0
    #: Fewer retries than configured, if the client asked for fewer (``x-inference-max-retries``).
    max_retries: int | None = None
    #: A stored response this call builds on or acts on: it must reach the replica holding it.
    response_id: str | None = None
    #: The body's type: JSON, or the client's multipart form with its boundary.
    content_type: str = "application/json"
    #: The key it came with, when the gateway has keys.
    tenant: Tenant | None = None
    outcome: Outcome = field(default_factory=Outcome)


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete answer: the backend's body bytes, relayed untouched."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(slots=True)
class Stream:
    """An answer still arriving: whole SSE frames; ``aclose`` stops the backend and frees the slot."""

    frames: AsyncIterator[bytes]
    headers: dict[str, str]
    upstream: UpstreamResponse
    release: Callable[[], None]
    closed: bool = False

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.release()
            await self.upstream.aclose()


@dataclass(frozen=True, slots=True)
class Sent:
    """An upstream answer whose headers arrived, and the replica that gave it."""

    response: UpstreamResponse
    replica: Replica


@dataclass(frozen=True, slots=True)
class Ticket:
    """A call admitted under its key's limits: what it reserved and holds, given back when it ends."""

    tenant: Tenant
    quota: Quota | None
    window: int
    #: Tokens reserved under the key's tpm (0: it has none), and the prompt's share of them.
    reserved: int
    prompt: int
    #: The key's concurrency slot it holds (None: the key has no max_concurrent).
    slot: Slot | None


@dataclass(frozen=True, slots=True)
class Plan:
    """Where a call goes: its destinations, each with its index among the model's targets."""

    destinations: list[tuple[int, Destination]]
    #: The replica holding the stored response the call is about.
    pinned: Replica | None = None


def _failure_kind(error: GatewayError) -> str:
    """A bounded label for an upstream failure that is not retried."""
    if isinstance(error, UpstreamStatusError):
        return str(error.status)
    return "bad_response" if isinstance(error, BadUpstreamResponse) else "other"


def _relayed_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The backend's headers a client may see: rate-limit hints, never server identities."""
    return {name: value for name, value in upstream.items() if name.lower().startswith("x-ratelimit-")}


class Engine:
    """Sends calls to the backends of a fleet, within the gateway's and each backend's limits."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        admission: Admission,
        retry_policy: retry.RetryPolicy,
        affinity: AffinityStore,
        windows: WindowStore,
        slots: SlotStore,
        default_completion_tokens: int = 256,
        on_retry: Callable[[retry.RetryEvent], None] | None = None,
        on_fallback: Callable[[retry.FallbackEvent], None] | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        #: Replaced whole on reload; each call keeps the fleet it started with.
        self.fleet = fleet
        self.admission = admission
        self.retry_policy = retry_policy
        self.affinity = affinity
        self.windows = windows
        self.slots = slots
        self.default_completion_tokens = default_completion_tokens
        self.on_retry = on_retry
        self.on_fallback = on_fallback
        self.tracer = tracer

    # One call, start to end.

    async def complete(self, call: Call) -> Reply:
        ticket = await self._enter(call)
        try:
            body, headers = await self._across(call, self._complete_at)
        except GatewayError as error:
            if ticket is not None and ticket.quota is not None:
                error.headers.update(ticket.quota.headers())
            raise
        finally:
            if ticket is not None:
                self._leave(ticket, call.outcome)
        if call.endpoint.method == "DELETE" and call.response_id is not None:
            self.affinity.forget(call.response_id)
        headers |= call.outcome.headers()
        if ticket is not None and ticket.quota is not None:
            headers |= ticket.quota.headers()
        return Reply(body, headers)

    async def stream(self, call: Call) -> Stream:
        """Start a stream; its slot is held until ``Stream.aclose``."""
        ticket = await self._enter(call)
        try:
            stream = await self._across(call, self._stream_at)
        except BaseException as error:
            if ticket is not None:
                self._leave(ticket, call.outcome)
                if isinstance(error, GatewayError) and ticket.quota is not None:
                    error.headers.update(ticket.quota.headers())
            raise
        stream.headers.update(call.outcome.headers())
        if ticket is not None:
            if ticket.quota is not None:
                stream.headers.update(ticket.quota.headers())
            if ticket.reserved:
                stream.frames = self._counted(stream.frames, call.outcome)
            release = stream.release

            def release_all() -> None:
                release()
                self._leave(ticket, call.outcome)

            stream.release = release_all
        return stream

    # Keys: limits taken before a call starts, given back when it ends.

    async def _enter(self, call: Call) -> Ticket | None:
        """Check the call's key and take what its limits allow, or raise 403, 429 or a queue timeout."""
        tenant = call.tenant
        if tenant is None:
            return None
        if call.endpoint.body:
            tenant.check_model(str(call.payload.get("model") or self.fleet.default_model))
        if not tenant.limited:
            return None
        config = tenant.config
        prompt, completion = estimate(call.raw, call.payload, self.default_completion_tokens)
        reserved = prompt + completion if config.tpm else 0
        quota, window = await self.windows.take(tenant, reserved) if config.rpm or config.tpm else (None, 0)
        slot = None
        if config.max_concurrent:
            started = time.monotonic()
            try:
                slot = await self.slots.acquire(tenant, within=self.admission.queue_timeout)
            except BaseException:
                if reserved:
                    self.windows.settle(tenant, window, -reserved)
                raise
            finally:
                call.outcome.queued += time.monotonic() - started
            if slot is None:
                if reserved:
                    self.windows.settle(tenant, window, -reserved)
                raise QueueTimeout(
                    f"The request waited over {self.admission.queue_timeout:g}s for one of its key's "
                    f"{config.max_concurrent} slots."
                )
        tenant.active += 1
        return Ticket(tenant, quota, window, reserved, prompt, slot)

    def _leave(self, ticket: Ticket, outcome: Outcome) -> None:
        tenant = ticket.tenant
        tenant.active -= 1
        if ticket.slot is not None:
            self.slots.release(tenant, ticket.slot)
        if ticket.reserved:
            if outcome.prompt_tokens is not None:
                used = outcome.prompt_tokens + (outcome.completion_tokens or 0)
            else:  # a stream without usage: the prompt as estimated, and one token per event
                used = ticket.prompt + outcome.events
            self.windows.settle(tenant, ticket.window, used - ticket.reserved)

    @staticmethod
    async def _counted(frames: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
        async for frame in frames:
            outcome.events += 1
            yield frame

    async def _across(self, call: Call, send: Callable[[Call, Destination, Replica | None], Awaitable[T]]) -> T:
        """``send`` to the call's first destination, then to the next while a target cannot answer.

        A stream moves on only before its first byte: ``stream`` returns once the headers came.
        """
        plan = await self._plan(call, self.fleet)
        outcome = call.outcome
        last = len(plan.destinations) - 1
        for position, (index, destination) in enumerate(plan.destinations):
            outcome.backend = destination.backend.name
            outcome.fallbacks = index
            try:
                return await send(call, destination, plan.pinned)
            except GatewayError as error:
                reason = retry.fallback_reason(error)
                if reason is None or position == last:
                    error.headers.update(outcome.headers())
                    raise
                following = plan.destinations[position + 1][1].backend.name
                if self.on_fallback is not None:
                    self.on_fallback(retry.FallbackEvent(call.request_id, destination.backend.name, following, reason))
        raise AssertionError("a plan has at least one destination")

    async def _plan(self, call: Call, fleet: Fleet) -> Plan:
        endpoint = call.endpoint
        model = call.payload.get("model") or fleet.default_model
        if call.response_id is not None:
            return await self._pinned(call.response_id, str(model), fleet)
        destinations = fleet.route(str(model))
        usable = [(i, d) for i, d in enumerate(destinations) if d.backend.can_serve(endpoint)]
        if not usable:
            raise InvalidRequest(
                f"{endpoint.path} is served by vLLM backends only, and '{model}' is not on one.", param="model"
            )
        return Plan(usable)

    async def _pinned(self, response_id: str, model: str, fleet: Fleet) -> Plan:
        """The backend and replica holding a stored response, for a call about it."""
        holder = await self.affinity.holder_of(response_id)
        backend = fleet.backends.get(holder[0]) if holder is not None else None
        replica = next((r for r in backend.replicas if holder and r.name == holder[1]), None) if backend else None
        if backend is None or replica is None:
            raise ResponseNotFound(f"No response with id '{response_id}' is known.", param="response_id")
        # An alias names, on the holder's backend, the model that backend knows it by.
        chain = fleet.aliases.get(model, ())
        model = next((target.model for target in chain if target.backend == backend.name), model)
        return Plan([(0, Destination(backend, model))], replica)

    async def _complete_at(
        self, call: Call, destination: Destination, pinned: Replica | None
    ) -> tuple[bytes, dict[str, str]]:
        backend = destination.backend
        await self._take_slot(call, backend)
        try:
            _, headers, body = await self._with_retries(call, destination, pinned, stream=False)
        finally:
            self._free_slot(backend)
        assert body is not None
        return body, headers

    async def _stream_at(self, call: Call, destination: Destination, pinned: Replica | None) -> Stream:
        backend = destination.backend
        await self._take_slot(call, backend)
        try:
            sent, headers, _ = await self._with_retries(call, destination, pinned, stream=True)
        except BaseException:
            self._free_slot(backend)
            raise

        def release() -> None:
            sent.replica.in_flight -= 1
            self._free_slot(backend)

        frames = sse.whole_frames(sent.response.chunks(), call.endpoint.stream_ends)
        if call.endpoint.stores_responses:
            frames = self._remembering(frames, backend, sent.replica)
        return Stream(frames, headers, sent.response, release)

    async def _remembering(
        self, frames: AsyncIterator[bytes], backend: Backend, replica: Replica
    ) -> AsyncIterator[bytes]:
        """Relay ``frames``, noting which replica holds the response the stream creates."""
        async for frame in frames:
            if b"response.created" in frame:
                created = sse.created_response_id(frame)
                if created is not None:
                    self.affinity.remember(created, (backend.name, replica.name))
            yield frame

    async def _take_slot(self, call: Call, backend: Backend) -> None:
        """Wait for a slot in the backend's lane; the backend counts the call until ``_free_slot``."""
        backend.enter()
        with self.tracer.span("queue", {"inference_core.priority": call.priority}):
            tenant = call.tenant
            share, weight = (tenant.name, tenant.config.weight) if tenant is not None else ("", 1.0)
            try:
                call.outcome.queued += await self.admission.acquire(
                    backend.lane, call.priority, share=share, weight=weight
                )
            except BaseException as error:
                backend.leave()
                if isinstance(error, QueueTimeout):
                    call.outcome.queued += self.admission.queue_timeout  # spent in line before moving on
                raise

    def _free_slot(self, backend: Backend) -> None:
        self.admission.release(backend.lane)
        backend.leave()

    @staticmethod
    def _routed(call: Call, model: str) -> tuple[Payload, bytes | None]:
        """The payload naming the model its backend knows, and its bytes when they are the client's."""
        if call.payload.get("model") == model or not call.endpoint.body:
            return call.payload, call.raw
        payload = {**call.payload, "model": model}
        if not call.endpoint.form or call.raw is None:
            return payload, None
        boundary = multipart.boundary(call.content_type)
        try:
            return payload, multipart.replace_field(call.raw, boundary or b"", "model", model)
        except ValueError:
            raise InvalidRequest(f"The form's model cannot be set to '{model}'.", param="model") from None

    @staticmethod
    def _translated(
        endpoint: Endpoint, payload: Payload, raw: bytes | None, replica: Replica
    ) -> tuple[bytes | None, tuple[str, ...]]:
        """The body as ``replica`` wants it (its provider decides), and the parameters it dropped."""
        if not endpoint.body:
            return None, ()
        translation = replica.provider.translate(endpoint, payload)
        if translation.changed or raw is None:
            raw = orjson.dumps(translation.payload)
        return raw, translation.dropped

    async def _with_retries(
        self, call: Call, destination: Destination, pinned: Replica | None, *, stream: bool
    ) -> tuple[Sent, dict[str, str], bytes | None]:
        """Send until an attempt succeeds, the error is not worth retrying, or time runs out.

        Each attempt goes to a replica this call has not tried yet, where there is one, unless
        the call is ``pinned`` to the replica holding its stored response.
        """
        backend = destination.backend
        outcome = call.outcome
        deadline = time.monotonic() + backend.timeout
        policy = self.retry_policy
        max_retries = policy.max_retries if call.max_retries is None else min(call.max_retries, policy.max_retries)
        payload, client_raw = self._routed(call, destination.model)
        name, attributes = self._span_details(call, destination) if self.tracer.enabled else ("", {})
        rate_limiter = backend.rate_limiter
        tried: list[Replica] = []
        while True:
            if rate_limiter is not None:
                # Waiting for the rate limit is waiting in line: it counts as queue time.
                waited = await rate_limiter.acquire(within=deadline - time.monotonic())
                outcome.queued += waited
                outcome.rate_limited += waited
            replica = pinned or backend.balancer.pick(payload, tried)
            raw, dropped = self._translated(call.endpoint, payload, client_raw, replica)
            tried.append(replica)
            started = time.perf_counter()
            replica.in_flight += 1
            replica.requests += 1
            try:
                with self.tracer.span(name, attributes, kind="client") as span:
                    span.set("server.address", replica.address)
                    result = await self._attempt(
                        call, backend, replica, raw, deadline - time.monotonic(), span, stream=stream
                    )
            except GatewayError as error:
                replica.in_flight -= 1
                outcome.upstream += time.perf_counter() - started
                why = retry.reason(error)
                outcome.upstream_errors.append((backend.name, why or _failure_kind(error)))
                self._blame(backend, replica, error)
                asked = error.retry_after if isinstance(error, UpstreamStatusError) else None
                if why == "429" and rate_limiter is not None:
                    rate_limiter.throttled(asked)
                if why is None or outcome.retries >= max_retries or not backend.balancer.healthy():
                    raise
                delay = policy.delay(outcome.retries, asked)
                if time.monotonic() + delay >= deadline:
                    raise
                if self.on_retry is not None:
                    self.on_retry(retry.RetryEvent(call.request_id, backend.name, outcome.retries + 1, why, delay))
                await asyncio.sleep(delay)
                outcome.backoff += delay
                outcome.retries += 1
            except BaseException:
                replica.in_flight -= 1
                raise
            else:
                if not stream:
                    replica.in_flight -= 1
                replica.succeeded()
                outcome.upstream += time.perf_counter() - started
                if rate_limiter is not None:
                    rate_limiter.succeeded()
                sent, headers, body = result
                if dropped:
                    headers[DROPPED_PARAMS_HEADER] = ",".join(dropped)
                return sent, headers, body

    @staticmethod
    def _blame(backend: Backend, replica: Replica, error: GatewayError) -> None:
        """Failures that say the replica is unwell (not the request) count toward its ejection.

        A request's failures never take the last replica in rotation out: one request's 500 says
        too little for that. Only failing health probes do (see ``HealthMonitor``).
        """
        replica.errors += 1
        unwell = not isinstance(error, UpstreamStatusError) or error.status >= 500
        others = len(backend.balancer.healthy()) > 1
        if unwell and others and replica.failed(eject_after=backend.balancer.eject_after):
            log.warning(
                "replica ejected",
                extra={"fields": {"backend": backend.name, "replica": replica.name, "address": replica.address}},
            )

    async def _attempt(
        self,
        call: Call,
        backend: Backend,
        replica: Replica,
        raw: bytes | None,
        within: float,
        span: Span,
        *,
        stream: bool,
    ) -> tuple[Sent, dict[str, str], bytes | None]:
        """One upstream attempt: send, and (unless streaming) read and check the body."""
        request_headers = {**backend.auth, "Content-Type": call.content_type, "X-Request-Id": call.request_id}
        self.tracer.inject(request_headers)
        response = await replica.transport.request(
            call.endpoint.method,
            call.endpoint.upstream,
            headers=request_headers,
            body=raw,
            within=within,
            stream=stream,
        )
        span.set("http.response.status_code", response.status)
        if response.status >= 400:
            raise upstream_error(replica.provider, response, await response.read())
        headers = _relayed_headers(response.headers)
        if stream:
            return Sent(response, replica), headers, None
        body = await response.read()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadUpstreamResponse("The backend answered with malformed JSON.") from None
        if isinstance(parsed, dict):
            if call.endpoint.stores_responses and isinstance(parsed.get("id"), str):
                self.affinity.remember(parsed["id"], (backend.name, replica.name))
            outcome = call.outcome
            outcome.model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
            outcome.count_usage(parsed.get("usage"))
            span.set("gen_ai.response.model", outcome.model)
            span.set("gen_ai.usage.input_tokens", outcome.prompt_tokens)
            span.set("gen_ai.usage.output_tokens", outcome.completion_tokens)
        return Sent(response, replica), headers, body

    @staticmethod
    def _span_details(call: Call, destination: Destination) -> tuple[str, dict[str, AttributeValue]]:
        """An upstream attempt's span name and OpenTelemetry GenAI attributes."""
        payload = call.payload
        operation = call.endpoint.operation
        model = destination.model
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": destination.backend.kind.value,
            "gen_ai.request.model": model,
        }
        for field_name, attribute in _REQUEST_ATTRIBUTES:
            value = payload.get(field_name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[attribute] = value
        return f"{operation} {model}", attributes

    # Side doors: models, outside the queue.

    async def models(self, request_id: str) -> bytes:
        """Every backend's models and every alias, each once; one backend's list relayed as written."""
        fleet = self.fleet
        backends = list(fleet.backends.values())
        if len(backends) == 1 and not fleet.aliases:
            return await backends[0].models(request_id)
        answers = await asyncio.gather(*(b.models(request_id) for b in backends), return_exceptions=True)
        merged: dict[str, object] = {}
        for answer in answers:
            for entry in model_entries(answer):
                merged.setdefault(entry["id"], entry)
        for alias in fleet.aliases:
            merged.setdefault(alias, model_entry(alias, "inference-core"))
        failures = [answer for answer in answers if isinstance(answer, GatewayError)]
        if not merged and failures:
            raise failures[0]
        return orjson.dumps({"object": "list", "data": list(merged.values())})

    async def model(self, model_id: str, request_id: str) -> bytes:
        """One model from the list: vLLM has no retrieve endpoint, and ids hold slashes."""
        for entry in model_entries(await self.models(request_id)):
            if entry["id"] == model_id:
                return orjson.dumps(entry)
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
