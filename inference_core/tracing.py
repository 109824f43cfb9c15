"""Tracing: OpenTelemetry spans when the operator asks for them, a no-op that costs nothing otherwise.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``); everything
else (endpoint, service name, sampler, resource attributes) comes from the standard ``OTEL_*``
variables, read by the OpenTelemetry SDK itself. The engine and the middleware speak only to
the small ``Tracer`` protocol below, so the SDK is imported only when tracing is on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from inference_core.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

AttributeValue = str | int | float | bool


class Span(Protocol):
    def set(self, key: str, value: AttributeValue | None) -> None: ...


class Tracer(Protocol):
    enabled: bool

    def span(
        self, name: str, attributes: Mapping[str, AttributeValue], *, kind: str = "internal"
    ) -> AbstractContextManager[Span]:
        """A child of the current span, current while the block runs; ``kind``: internal, client, server."""
        ...

    def server_span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[Span]:
        """The root span of one request, continuing the client's ``traceparent`` if it sent one."""
        ...

    def inject(self, headers: dict[str, str]) -> None:
        """Add ``traceparent`` (and ``tracestate``) for the current span to upstream headers."""
        ...


class _NoSpan:
    def set(self, key: str, value: AttributeValue | None) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class NoTracer:
    """Tracing off: every call is a constant-time no-op."""

    enabled = False
    _span = _NoSpan()

    def span(self, name: str, attributes: Mapping[str, AttributeValue], *, kind: str = "internal") -> _NoSpan:
        return self._span

    def server_span(self, name: str, headers: Mapping[str, str]) -> _NoSpan:
        return self._span

    def inject(self, headers: dict[str, str]) -> None:
        pass


NO_TRACER: Tracer = NoTracer()


class _OTelSpan:
    def __init__(self, span: Any) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)


class OTelTracer:
    """Spans through an OpenTelemetry ``TracerProvider``; W3C trace context in and out."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("inference_core")
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER}

    @contextmanager
    def span(self, name: str, attributes: Mapping[str, AttributeValue], *, kind: str = "internal") -> Iterator[Span]:
        with self._tracer.start_as_current_span(name, kind=self._kinds[kind], attributes=attributes) as span:
            yield _OTelSpan(span)

    @contextmanager
    def server_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Span]:
        parent = self._propagator.extract(headers)
        with self._tracer.start_as_current_span(name, context=parent, kind=self._kinds["server"]) as span:
            yield _OTelSpan(span)

    def inject(self, headers: dict[str, str]) -> None:
        self._propagator.inject(headers)


def tracer_from_environment() -> Tracer:
    """The tracer the ``OTEL_*`` variables ask for, or ``NO_TRACER``."""
    exporters = [
        name.strip()
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip() not in ("", "none")
    ]
    if not exporters or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return NO_TRACER
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER: tracing needs the OpenTelemetry SDK (pip install 'inference-core[tracing]')"
        ) from None

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "inference-core")})
    provider = TracerProvider(resource=resource)
    for name in exporters:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            exporter = OTLPSpanExporter()
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter '{name}' (accepts: otlp, console, none)")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return OTelTracer(provider)
