"""What observability costs per request, measured in-process with the gateway's own objects.

Times, per request: recording metrics and writing the JSON access-log line (what the middleware
does once a response is done), the no-op tracer calls made when tracing is off, the same calls
with OpenTelemetry on (spans to a discarding exporter), and the per-event cost of stream timing.
Medians of --runs runs of --n iterations.

    python bench/observability_cost.py [--n 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from inference_core.engine import Outcome
from inference_core.observability import Metrics, RequestContext, RequestRecord, configure_logging
from inference_core.observability.logs import LoopFlushedHandler
from inference_core.tracing import NO_TRACER, OTelTracer, Tracer

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SCOPE = {"method": "POST", "headers": []}


class Discard(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_call_us(work: Callable[[], None], n: int, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(n):
            work()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def tracer_calls(tracer: Tracer) -> Callable[[], None]:
    """The tracer calls one non-streaming request makes."""
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": MODEL}

    def work() -> None:
        with tracer.server_span("POST /v1/chat/completions", {}) as root:
            with tracer.span("queue", {}):
                pass
            with tracer.span(f"chat {MODEL}", attributes, kind="client") as span:
                tracer.inject({})
                span.set("http.response.status_code", 200)
            root.set("http.response.status_code", 200)

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    configure_logging("info", "json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, LoopFlushedHandler)
    handler.fd = os.open(os.devnull, os.O_WRONLY)
    metrics = Metrics(configured_model=MODEL)
    context = RequestContext(lambda *a: None, metrics=metrics, tracer=NO_TRACER)  # type: ignore[arg-type]

    def record() -> RequestRecord:
        started = time.perf_counter()
        outcome = Outcome(queued=0.0001, upstream=0.001, model=MODEL, prompt_tokens=12, completion_tokens=20)
        return RequestRecord("0123456789abcdef", started - 0.002, model=MODEL, outcome=outcome)

    prepared = record()
    now = time.perf_counter()
    chat = "/v1/chat/completions"
    rows = [
        ("metrics (all series of one request)", lambda: context._measure(prepared, chat, 200, now, now)),
        ("access log line (JSON, INFO)", lambda: context._log(SCOPE, prepared, chat, 200, now)),
        ("tracing off (no-op tracer calls)", tracer_calls(NO_TRACER)),
    ]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    rows.append(("tracing on (3 spans, OTel SDK)", tracer_calls(OTelTracer(provider))))
    streaming = record()
    clock = iter(range(10**9))
    rows.append(("stream timing, per event", lambda: streaming.event_sent(next(clock) * 0.001, metrics)))
    print(f"{'what':40} {'µs':>8}")
    for name, work in rows:
        print(f"{name:40} {per_call_us(work, args.n, args.runs):>8.2f}")


if __name__ == "__main__":
    main()
