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
from dataclasses import dataclass
from typing import TypeVar

import orjson

from inference_core import multipart, sse
from inference_core.endpoints import Endpoint
from inference_core.engine import retry, usage
from inference_core.engine.admission import Admission
from inference_core.engine.affinity import AffinityStore
from inference_core.engine.backend import Backend, model_entries, model_entry, upstream_error
from inference_core.engine.call import Call, Reply, Stream
from inference_core.engine.fleet import Destination, Fleet
from inference_core.engine.gate import KeyGate
from inference_core.engine.replicas import Replica
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

log = logging.getLogger("inference_core")
T = TypeVar("T")
_REQUEST_ATTRIBUTES = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
)


@dataclass(frozen=True, slots=True)
class Sent:
    """An upstream answer whose headers arrived, and the replica that gave it."""

    response: UpstreamResponse
    replica: Replica


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
        gate: KeyGate,
        on_retry: Callable[[retry.RetryEvent], None] | None = None,
        on_fallback: Callable[[retry.FallbackEvent], None] | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        #: Replaced whole on reload; each call keeps the fleet it started with.
        self.fleet = fleet
        self.admission = admission
        self.retry_policy = retry_policy
        self.affinity = affinity
        self.gate = gate
        self.on_retry = on_retry
        self.on_fallback = on_fallback
        self.tracer = tracer

    # One call, start to end.

    async def complete(self, call: Call) -> Reply:
        ticket = await self.gate.enter(call, self._model(call))
        try:
            body, headers = await self._across(call, self._complete_at)
        except GatewayError as error:
            if ticket is not None:
                error.headers.update(ticket.headers())
            raise
        finally:
            if ticket is not None:
                self.gate.leave(ticket, call.outcome)
        if call.endpoint.method == "DELETE" and call.response_id is not None:
            self.affinity.forget(call.response_id)
        headers |= call.outcome.headers()
        if ticket is not None:
            headers |= ticket.headers()
        return Reply(body, headers)

    async def stream(self, call: Call) -> Stream:
        """Start a stream; its slot is held until ``Stream.aclose``."""
        ticket = await self.gate.enter(call, self._model(call))
        try:
            stream = await self._across(call, self._stream_at)
        except BaseException as error:
            if ticket is not None:
                self.gate.leave(ticket, call.outcome)
                if isinstance(error, GatewayError):
                    error.headers.update(ticket.headers())
            raise
        stream.headers.update(call.outcome.headers())
        if ticket is not None:
            stream.headers.update(ticket.headers())
            if ticket.reserved:
                stream.frames = self.gate.counted(stream.frames, call.outcome)
            release = stream.release

            def release_all() -> None:
                release()
                self.gate.leave(ticket, call.outcome)

            stream.release = release_all
        return stream

    def _model(self, call: Call) -> str:
        """The model a call asks for: the body's, else the default (which may be an alias)."""
        return str(call.payload.get("model") or self.fleet.default_model)

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
        model = self._model(call)
        if call.response_id is not None:
            return await self._pinned(call.response_id, model, fleet)
        destinations = fleet.route(model)
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
        # Exact usage for the key's tokens, metrics and logs, even where the client did not ask for it.
        hide_usage = call.endpoint.usage_on_request and backend.config.stream_usage and not usage.asked(call.payload)
        await self._take_slot(call, backend)
        try:
            sent, headers, _ = await self._with_retries(call, destination, pinned, stream=True, ask_usage=hide_usage)
        except BaseException:
            self._free_slot(backend)
            raise

        def release() -> None:
            sent.replica.in_flight -= 1
            self._free_slot(backend)

        frames = sse.whole_frames(sent.response.chunks(), call.endpoint.stream_ends)
        if call.endpoint.stores_responses:
            frames = self._remembering(frames, backend, sent.replica)
        frames = usage.counted(frames, call.outcome, hide=hide_usage)
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
        self, call: Call, destination: Destination, pinned: Replica | None, *, stream: bool, ask_usage: bool = False
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
        if ask_usage:
            payload, client_raw = usage.ask(payload, client_raw)
        name, attributes = self._span_details(call, destination) if self.tracer.enabled else ("", {})
        rate_limiter = backend.rate_limiter
        prompt = await backend.prompt(call.endpoint, payload) if backend.cache_aware and pinned is None else None
        tried: list[Replica] = []
        while True:
            if rate_limiter is not None:
                # Waiting for the rate limit is waiting in line: it counts as queue time.
                waited = await rate_limiter.acquire(within=deadline - time.monotonic())
                outcome.queued += waited
                outcome.rate_limited += waited
            replica = pinned or backend.balancer.pick(payload, tried, prompt)
            if prompt is not None and replica.kv is not None:
                outcome.cached_blocks = replica.kv.routed(prompt)
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
