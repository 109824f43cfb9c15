"""Tracing: a gateway run in-process with an in-memory exporter, spans checked for shape and GenAI attributes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inference_core.api import create_app
from inference_core.config import ConfigError, Settings
from inference_core.tracing import NO_TRACER, OTelTracer, tracer_from_environment
from tests.conftest import MODEL, chat_body, sim_stats
from tests.servers import Server, free_port, until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced(simulator: Server) -> Iterator[tuple[str, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    port = free_port()
    settings = Settings(base_url=simulator.url + "/v1", model=MODEL)  # type: ignore[arg-type]
    app = create_app(settings, tracer=OTelTracer(provider))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, "the traced gateway did not start")
    yield f"http://127.0.0.1:{port}", exporter
    server.should_exit = True
    thread.join(10)


def _finished(exporter: InMemorySpanExporter, name: str) -> dict[str, ReadableSpan] | None:
    """The finished spans by name, once ``name`` is among them (a request's own ends just after its answer)."""
    spans = {span.name: span for span in exporter.get_finished_spans()}
    return spans if name in spans else None


def test_request_span_tree(traced: tuple[str, InMemorySpanExporter], simulator: Server) -> None:
    url, exporter = traced
    exporter.clear()
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    response = httpx.post(
        url + "/v1/chat/completions", json=chat_body(temperature=0.5), headers={"traceparent": traceparent}
    )
    assert response.status_code == 200
    spans = until(lambda: _finished(exporter, "POST /v1/chat/completions"), "the request's span never ended")
    root = spans["POST /v1/chat/completions"]
    queue = spans["queue"]
    upstream = spans[f"chat {MODEL}"]
    assert root.kind is SpanKind.SERVER and upstream.kind is SpanKind.CLIENT
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN
    assert queue.parent.span_id == root.context.span_id and upstream.parent.span_id == root.context.span_id
    usage = response.json()["usage"]
    assert upstream.attributes["gen_ai.operation.name"] == "chat"
    assert upstream.attributes["gen_ai.provider.name"] == "vllm"
    assert upstream.attributes["gen_ai.request.model"] == MODEL
    assert upstream.attributes["gen_ai.request.temperature"] == 0.5
    assert upstream.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert upstream.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert upstream.attributes["http.response.status_code"] == 200
    assert root.attributes["http.response.status_code"] == 200
    sent = sim_stats(simulator)["last_headers"]["traceparent"]
    assert sent == f"00-{TRACE_ID}-{upstream.context.span_id:016x}-01"


def test_each_retry_is_a_span(traced: tuple[str, InMemorySpanExporter]) -> None:
    url, exporter = traced
    exporter.clear()
    httpx.post(url + "/v1/chat/completions", json=chat_body(sim_fault="status=503,times=1,tag=trace-retry"), timeout=30)
    attempts = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert [span.attributes["http.response.status_code"] for span in attempts] == [503, 200]
    assert not attempts[0].status.is_ok


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracer_from_environment() is NO_TRACER
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracer_from_environment() is NO_TRACER
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracer = tracer_from_environment()
    assert isinstance(tracer, OTelTracer)
    tracer.provider.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        tracer_from_environment()
