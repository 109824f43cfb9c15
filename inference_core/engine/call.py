"""What routes hand the engine (a ``Call``), what it gives back (a ``Reply`` or a ``Stream``), and
what happened on the way (an ``Outcome``, read by headers, logs, metrics and spans).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from inference_core.endpoints import Endpoint
from inference_core.engine.tenants import Tenant
from inference_core.providers.base import Payload
from inference_core.upstream import UpstreamResponse

QUEUE_MS_HEADER = "x-inference-queue-ms"
RETRIES_HEADER = "x-inference-retries"
BACKEND_HEADER = "x-inference-backend"
FALLBACKS_HEADER = "x-inference-fallbacks"


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
    #: cache_aware: the prompt blocks the chosen replica was believed to hold (None: not routed on the cache).
    cached_blocks: int | None = None

    def headers(self) -> dict[str, str]:
        headers = {QUEUE_MS_HEADER: f"{self.queued * 1000:.1f}", RETRIES_HEADER: str(self.retries)}
        if self.backend is not None:
            headers[BACKEND_HEADER] = self.backend
            headers[FALLBACKS_HEADER] = str(self.fallbacks)
        return headers

    @classmethod
    def summed(cls, outcomes: list[Outcome]) -> Outcome:
        """The tokens of several calls together (None where none of them reported any)."""
        prompt = [o.prompt_tokens for o in outcomes if o.prompt_tokens is not None]
        completion = [o.completion_tokens for o in outcomes if o.completion_tokens is not None]
        return cls(
            prompt_tokens=sum(prompt) if prompt else None, completion_tokens=sum(completion) if completion else None
        )

    def count_usage(self, usage: object) -> None:
        """Chat and completions say prompt/completion tokens; the Responses and Messages APIs input/output.

        A count the usage leaves out is kept: an Anthropic stream tells its input tokens first
        (``message_start``) and its output tokens last (``message_delta``).
        """
        if isinstance(usage, dict):
            prompt = _int_or_none(usage.get("prompt_tokens", usage.get("input_tokens")))
            completion = _int_or_none(usage.get("completion_tokens", usage.get("output_tokens")))
            self.prompt_tokens = self.prompt_tokens if prompt is None else prompt
            self.completion_tokens = self.completion_tokens if completion is None else completion


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
