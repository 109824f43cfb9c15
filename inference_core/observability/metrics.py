"""Prometheus metrics, all named ``inference_core_*``, all with bounded label sets.

Labels never carry free text: ``endpoint`` is a route template, ``model`` is a model the
gateway knows (configured, or listed by the backend) or ``other``, ``status_class`` is ``2xx``
and the like, reasons and kinds come from fixed vocabularies. The registry belongs to one app,
and one process is the deployment unit: the queue lives in that process, so scale out with
replicas rather than uvicorn workers (which would each have their own queue); limits may be
shared between replicas through Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from inference_core.engine import Admission, FallbackEvent, Fleet, RetryEvent
from inference_core.engine.replicas import Replica

#: The largest number of distinct model names used as label values.
MAX_MODEL_LABELS = 64
OTHER = "other"
M = TypeVar("M", Counter, Histogram)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_QUEUE = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_OVERHEAD = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_GAP = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BLOCKS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, *, configured_model: str) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.models = {configured_model}
        self._children: dict[tuple[object, ...], Any] = {}

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(f"inference_core_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: Iterable[str] = ()) -> Histogram:
            return Histogram(f"inference_core_{name}", doc, labels, buckets=buckets, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"inference_core_{name}", doc, registry=registry)

        self.requests = counter(
            "requests", "Requests answered, by endpoint, model and status class.", ("endpoint", "model", "status_class")
        )
        self.latency = histogram(
            "request_duration_seconds", "Request to the end of the response (streams: to the last event).", _LATENCY,
            ("endpoint",),
        )  # fmt: skip
        self.upstream_latency = histogram(
            "upstream_duration_seconds",
            "Time waiting on the backend per request, over all attempts (streams: to the first byte).",
            _LATENCY,
            ("endpoint", "backend"),
        )
        self.queue_wait = histogram("queue_wait_seconds", "Time waiting for a slot or the rate limit.", _QUEUE)
        self.overhead = histogram(
            "overhead_seconds", "The gateway's own time on a request: to response start, less queue and backend.",
            _OVERHEAD, ("endpoint",),
        )  # fmt: skip
        self.ttft = histogram("time_to_first_token_seconds", "Request to the first stream event.", _TTFT, ("endpoint",))
        self.gaps = histogram("stream_event_gap_seconds", "Time between events relayed on a stream.", _GAP)
        self.routed_cached_blocks = histogram(
            "routed_cached_blocks",
            "cache_aware: prompt blocks the chosen replica was believed to hold in its KV cache.",
            _BLOCKS,
        )
        self.tokens = counter(
            "tokens", "Tokens counted from the backend's usage, by kind and model.", ("kind", "model")
        )
        self.retries = counter("upstream_retries", "Upstream attempts retried, by reason.", ("reason", "backend"))
        self.upstream_errors = counter(
            "upstream_errors",
            "Failed upstream attempts, by kind (HTTP status, connect, timeout...).",
            ("kind", "backend"),
        )
        self.key_requests = counter(
            "key_requests", "Requests answered per key, by status class.", ("key", "status_class")
        )
        self.key_tokens = counter("key_tokens", "Tokens used per key, by kind (prompt, completion).", ("key", "kind"))
        self.key_rejections = counter(
            "key_rejections", "Requests refused per key, by reason (rpm, tpm, model_not_allowed...).", ("key", "reason")
        )
        self.batch_lines = counter("batch_lines", "Batch lines run, by result (completed, failed).", ("status",))
        self.fallbacks = counter(
            "fallbacks", "Requests moved on to their model's next target, by reason.", ("from", "to", "reason")
        )
        self.disconnects = counter(
            "client_disconnects", "Clients that left before their answer ended, by phase.", ("phase",)
        )
        self.queue_depth = gauge("queue_depth", "Requests waiting for a slot.")
        self.in_flight = gauge("in_flight", "Requests holding a slot (sent upstream, or streaming).")
        self.concurrency_limit = gauge("concurrency_limit", "Slots: INFERENCE_MAX_CONCURRENT_TASKS.")
        self.rate_limited = counter("rate_limit_waits", "Upstream sends that waited for the rate limit.")

    def watch(self, admission: Admission, fleet: Callable[[], Fleet]) -> None:
        """Gauges read at scrape time, so the request path pays nothing for them."""
        self.registry.register(BackendCollector(fleet))
        self.queue_depth.set_function(lambda: admission.waiting)
        self.in_flight.set_function(lambda: admission.in_flight)
        self.concurrency_limit.set_function(lambda: admission.max_in_flight)

    def watch_batches(self, running: Callable[[], dict[str, str]]) -> None:
        """``inference_core_batches{status}``: the batches this gateway is running, by status."""
        self.registry.register(BatchCollector(running))

    def batch_line(self, status: str) -> None:
        self.of(self.batch_lines, status).inc()

    def watch_redis(self, up: Callable[[], bool]) -> None:
        gauge = Gauge("inference_core_redis_up", "1 while the shared limits store answers.", registry=self.registry)
        gauge.set_function(lambda: 1.0 if up() else 0.0)

    def of(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, remembered: label sets are few and a request touches several."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def learn_models(self, names: Iterable[str]) -> None:
        for name in names:
            if len(self.models) >= MAX_MODEL_LABELS:
                break
            self.models.add(name)

    def model_label(self, name: str | None) -> str:
        return name if name in self.models else OTHER

    def retried(self, event: RetryEvent) -> None:
        self.of(self.retries, event.reason, event.backend).inc()

    def fell_back(self, event: FallbackEvent) -> None:
        self.of(self.fallbacks, event.source, event.target, event.reason).inc()


class BatchCollector:
    def __init__(self, running: Callable[[], dict[str, str]]) -> None:
        self.running = running

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "inference_core_batches", "Batches this gateway is running, by status.", labels=["status"]
        )
        statuses = list(self.running().values())
        for status in ("validating", "in_progress", "finalizing", "cancelling", "expired"):
            family.add_metric([status], statuses.count(status))
        yield family


class BackendCollector:
    """Per-backend and per-replica figures, read from the fleet in force when Prometheus scrapes."""

    def __init__(self, fleet: Callable[[], Fleet]) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        backends = list(self.fleet().backends.values())

        def backend_gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"inference_core_{name}", doc, labels=["backend"])

        up = backend_gauge("backend_up", "1 while at least one of the backend's replicas is in rotation.")
        in_flight = backend_gauge("backend_in_flight", "Requests holding one of the backend's slots.")
        queued = backend_gauge("backend_queue_depth", "Requests waiting for one of the backend's slots.")
        rate = backend_gauge("rate_limit_rps", "The backend's adaptive upstream rate limit in force (0: no limit).")
        for backend in backends:
            up.add_metric([backend.name], 1 if any(r.healthy for r in backend.replicas) else 0)
            in_flight.add_metric([backend.name], backend.lane.in_flight)
            queued.add_metric([backend.name], backend.lane.waiting)
            rate.add_metric([backend.name], backend.rate_limiter.rate if backend.rate_limiter is not None else 0)
        yield from (up, in_flight, queued, rate)

        labels = ("backend", "replica")

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"inference_core_replica_{name}", doc, labels=[*labels, *extra])

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"inference_core_replica_{name}", doc, labels=labels)

        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "healthy": gauge("up", "1 while the replica is in rotation."),
            "in_flight": gauge("in_flight", "Requests at the replica now."),
            "requests": counter("requests", "Attempts sent to the replica."),
            "errors": counter("errors", "Failed attempts at the replica."),
            "ejections": counter("ejections", "Times the replica was taken out of rotation."),
        }
        probe = gauge("probe_seconds", "Duration of the replica's last health probe.")
        load = gauge("load", "Load the replica reported (load_aware): waiting, running, kv_cache.", ("kind",))
        for backend in backends:
            for replica in backend.replicas:
                names = [backend.name, replica.name]
                for attribute, family in families.items():
                    family.add_metric(names, float(getattr(replica, attribute)))
                if replica.probe_ms is not None:
                    probe.add_metric(names, replica.probe_ms / 1000)
                if replica.load is not None:
                    for kind in ("waiting", "running", "kv_cache"):
                        load.add_metric([*names, kind], getattr(replica.load, kind))
        yield from families.values()
        yield probe
        yield load
        yield from _kv_families([(backend.name, replica) for backend in backends for replica in backend.replicas])


def _kv_families(replicas: list[tuple[str, Replica]]) -> Iterator[Metric]:
    """cache_aware's view of each replica with a KV-event feed."""
    labels = ["backend", "replica"]
    up = GaugeMetricFamily("inference_core_kv_events_up", "1 while the replica's KV events are trusted.", labels=labels)
    blocks = GaugeMetricFamily(
        "inference_core_kv_index_blocks", "Blocks the gateway believes the replica holds.", labels=labels
    )
    received = CounterMetricFamily(
        "inference_core_kv_events", "KV events applied from the replica, by type.", labels=[*labels, "type"]
    )
    for backend, replica in replicas:
        feed = replica.kv
        if feed is None:
            continue
        names = [backend, replica.name]
        up.add_metric(names, 1 if feed.trusted else 0)
        blocks.add_metric(names, len(feed.index))
        for kind in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
            received.add_metric([*names, kind], feed.counts[kind])
    yield from (up, blocks, received)
