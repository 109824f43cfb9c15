"""Metrics, logs, health and graceful drain, observed from outside a running gateway."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, chat_body
from tests.servers import Server, free_port, metric, until

Spawn = Callable[..., Server]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gateway: Server) -> Samples:
    text = httpx.get(gateway.url + "/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_request_metrics_move(gateway: Server, http: httpx.Client) -> None:
    before = scrape(gateway)
    usage = http.post("/v1/chat/completions", json=chat_body()).json()["usage"]
    http.post("/v1/chat/completions", json=chat_body(model="not-a-served-model"))
    after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat = "/v1/chat/completions"
    assert delta("inference_core_requests_total", endpoint=chat, model=MODEL, status_class="2xx") == 1
    assert delta("inference_core_requests_total", endpoint=chat, model="other", status_class="4xx") == 1
    assert delta("inference_core_tokens_total", kind="prompt", model=MODEL) == usage["prompt_tokens"]
    assert delta("inference_core_tokens_total", kind="completion", model=MODEL) == usage["completion_tokens"]
    assert delta("inference_core_request_duration_seconds_count", endpoint=chat) == 2
    assert delta("inference_core_upstream_duration_seconds_count", endpoint=chat, backend="default") == 2
    assert delta("inference_core_overhead_seconds_count", endpoint=chat) == 1
    assert delta("inference_core_queue_wait_seconds_count") == 2
    assert delta("inference_core_upstream_errors_total", kind="404", backend="default") == 1
    assert value(after, "inference_core_concurrency_limit") == 500
    assert value(after, "inference_core_backend_up", backend="default") == 1
    assert value(after, "inference_core_in_flight") == 0 and value(after, "inference_core_queue_depth") == 0


def test_overhead_histogram_has_sub_millisecond_buckets(gateway: Server) -> None:
    buckets = {
        dict(labels)["le"]
        for name, labels in scrape(gateway)
        if name == "inference_core_overhead_seconds_bucket" and dict(labels).get("endpoint") == "/v1/chat/completions"
    }
    assert {"0.0001", "0.0005", "0.001"} <= buckets


def test_retries_and_upstream_errors_are_counted(gateway: Server, http: httpx.Client) -> None:
    before = scrape(gateway)
    response = http.post("/v1/chat/completions", json=chat_body(sim_fault="status=503"))
    after = scrape(gateway)
    assert response.status_code == 503
    retried = value(after, "inference_core_upstream_retries_total", reason="503", backend="default") - value(
        before, "inference_core_upstream_retries_total", reason="503", backend="default"
    )
    failed = value(after, "inference_core_upstream_errors_total", kind="503", backend="default") - value(
        before, "inference_core_upstream_errors_total", kind="503", backend="default"
    )
    assert retried == 3 and failed == 4


def test_stream_metrics_and_aborts(gateway: Server, http: httpx.Client) -> None:
    before = scrape(gateway)
    body = chat_body(stream=True, max_tokens=5, stream_options={"include_usage": True}, sim_fault="itl=0.02")
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.read()
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True, sim_fault="itl=0.2")) as response:
        next(response.iter_lines())
    chat = "/v1/chat/completions"

    def both_recorded() -> Samples | None:  # a stream is counted once it has ended, after its last byte
        samples = scrape(gateway)
        done = value(samples, "inference_core_request_duration_seconds_count", endpoint=chat) - value(
            before, "inference_core_request_duration_seconds_count", endpoint=chat
        )
        return samples if done == 2 else None

    after = until(both_recorded, "the two streams were never counted")
    assert (
        value(after, "inference_core_time_to_first_token_seconds_count", endpoint=chat)
        - value(before, "inference_core_time_to_first_token_seconds_count", endpoint=chat)
        == 2
    )
    assert value(after, "inference_core_stream_event_gap_seconds_count") > value(
        before, "inference_core_stream_event_gap_seconds_count"
    )
    assert (
        value(after, "inference_core_tokens_total", kind="completion", model=MODEL)
        - value(before, "inference_core_tokens_total", kind="completion", model=MODEL)
        == 5
    )
    assert (
        value(after, "inference_core_client_disconnects_total", phase="streaming")
        - value(before, "inference_core_client_disconnects_total", phase="streaming")
        == 1
    )


def _lines(server: Server) -> list[str]:
    """The complete lines a server has written so far.

    Split on newlines only: ``str.splitlines`` also splits at U+0085 and other Unicode line
    breaks, which may stand raw inside a JSON string (a fuzzed model name, say).
    """
    return server.output.split("\n")[:-1]


def _log_line(server: Server, request_id: str) -> dict[str, object]:
    """The access log line of ``request_id``, once written (just after the answer went out)."""

    def found() -> dict[str, object] | None:
        for line in _lines(server):
            if request_id in line and '"logger":"inference_core.access"' in line:
                return json.loads(line)
        return None

    return until(found, f"no access log line for {request_id}")


def test_one_json_log_line_per_request(gateway: Server, http: httpx.Client) -> None:
    http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "log-check-1"})
    line = _log_line(gateway, "log-check-1")
    assert line["endpoint"] == "/v1/chat/completions" and line["status"] == 200 and line["model"] == MODEL
    assert {"ts", "level", "latency_ms", "queue_ms", "retries", "prompt_tokens", "completion_tokens"} <= line.keys()
    with contextlib.suppress(httpx.TimeoutException):  # a client that leaves early is logged too
        http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "log-check-2"}, timeout=0.001)
    for line_text in _lines(gateway):
        json.loads(line_text)  # every line is JSON, uvicorn's included
    assert "sk-test-secret-4f9a" not in gateway.output
    assert "Hello!" not in gateway.output, "bodies are never logged"


def test_text_log_format(spawn: Spawn, simulator: Server) -> None:
    gateway = spawn("gateway", simulator.url, log_format="text")
    httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers={"x-request-id": "text-log-1"})
    line = until(
        lambda: next((line for line in _lines(gateway) if "request_id=text-log-1 " in line), None),
        "no access log line for text-log-1",
    )
    assert "status=200" in line


def test_health_report_and_readiness(gateway: Server, http: httpx.Client) -> None:
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["provider"] == "vllm"
    assert health["backend"]["reachable"] is True and health["backend"]["version"] == "0.12.0"
    assert health["queue"] == {"depth": 0, "capacity": 10000} and health["concurrency_limit"] == 500
    assert "sk-test" not in json.dumps(health)
    assert http.get("/health/live").status_code == 200
    assert http.get("/health/ready").status_code == 200


def test_readiness_follows_the_backend(spawn: Spawn) -> None:
    backend = spawn("simulator")
    gateway = spawn("gateway", backend.url, probe_interval="0.2")
    assert httpx.get(gateway.url + "/health/ready").status_code == 200
    backend.stop()
    until(lambda: httpx.get(gateway.url + "/health/ready").status_code == 503, "still ready with the backend gone")
    assert httpx.get(gateway.url + "/health/live").status_code == 200
    assert httpx.get(gateway.url + "/health").json()["backend"]["reachable"] is False


def test_not_ready_without_backend(spawn: Spawn) -> None:
    gateway = spawn("gateway", f"http://127.0.0.1:{free_port()}")
    assert httpx.get(gateway.url + "/health/live").status_code == 200
    ready = httpx.get(gateway.url + "/health/ready")
    assert ready.status_code == 503 and ready.json()["reason"] == "backend unreachable"


def test_sigterm_drains_then_exits_zero(spawn: Spawn, simulator: Server) -> None:
    gateway = spawn("gateway", simulator.url, shutdown_grace="10")
    # Four seconds of stream: room for the checks below, made while it runs, on a busy machine.
    body = chat_body(stream=True, max_tokens=40, ignore_eos=True, sim_fault="itl=0.1")

    def stream() -> list[str]:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as response:
            return [line for line in response.iter_lines() if line.startswith("data: ")]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        until(lambda: metric(gateway, "inference_core_in_flight") == 1, "the stream never started")
        gateway.process.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(gateway.url + "/health/ready").status_code == 503, "still ready after SIGTERM")
        assert running.running(), "the stream outlived the checks"
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"]
        events = running.result(timeout=30)
    assert events[-1] == "data: [DONE]" and len(events) >= 40
    assert gateway.process.wait(10) == 0


def test_dashboard_uses_only_real_metrics(http: httpx.Client) -> None:
    families = {family.name for family in text_string_to_metric_families(http.get("/metrics").text)}
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/kubernetes/grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"inference_core_\w+", target["expr"])
    }
    missing = {name for name in used if re.sub(r"_(total|bucket|count|sum)$", "", name) not in families}
    assert used and not missing, missing


def test_the_error_logged_is_the_one_the_client_received(gateway: Server, http: httpx.Client) -> None:
    cases = {
        "error-404": chat_body(model="no-such-model"),
        "error-400": chat_body(sim_fault="status=400"),
        "error-500": chat_body(sim_fault="status=500"),
    }
    for request_id, body in cases.items():
        answer = http.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id}).json()["error"]
        assert _log_line(gateway, request_id)["error"] == (answer["code"] or answer["type"]), request_id
    assert _log_line(gateway, "error-404")["error"] == "invalid_request_error"  # OpenAI's type for a 404
    assert _log_line(gateway, "error-500")["error"] == "server_error"
    http.post("/v1/messages", json={"model": "no-such-model", "max_tokens": 5, "messages": []},
              headers={"x-request-id": "error-anthropic"})  # fmt: skip
    assert _log_line(gateway, "error-anthropic")["error"] == "not_found_error"
