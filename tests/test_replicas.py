"""Several simulator replicas behind one gateway: failover, ejection, and each balancing policy."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import MODEL, chat_body, sim_stats
from tests.servers import Server, free_port, start_simulator, until

Spawn = Callable[..., Server]


def _urls(*servers: Server) -> str:
    return ",".join(server.url for server in servers)


def _served(*backends: Server) -> list[int]:
    return [sim_stats(backend)["requests"].get("/v1/chat/completions", 0) for backend in backends]


def _replica(gateway: Server, name: str) -> dict[str, object]:
    replicas = httpx.get(gateway.url + "/health").json()["replicas"]
    return next(replica for replica in replicas if replica["name"] == name)


def test_killed_replica_loses_no_request_and_comes_back(spawn: Spawn, log_dir: Path) -> None:
    ports = [free_port() for _ in range(3)]
    backends = [start_simulator(log_dir, port=port) for port in ports]
    gateway = spawn("gateway", _urls(*backends), probe_interval="0.3", eject_after="2")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/chat/completions", json=chat_body()).status_code)
                time.sleep(0.01)

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = [pool.submit(traffic) for _ in range(2)]
            until(lambda: len(statuses) > 20, "no traffic")
            backends[1].stop()
            until(lambda: not _replica(gateway, "r1")["healthy"], "the dead replica was not ejected")
            backends[1] = start_simulator(log_dir, port=ports[1])
            until(lambda: _replica(gateway, "r1")["healthy"], "the replica was not readmitted")
            before = _served(backends[1])[0]
            until(lambda: _served(backends[1])[0] > before, "the readmitted replica gets no traffic again")
            until(lambda: len(statuses) > 50, "too little traffic")
            stop.set()
            for future in running:
                future.result()
        assert set(statuses) == {200}, collections.Counter(statuses)
        metrics = httpx.get(gateway.url + "/metrics").text
        assert 'inference_core_replica_ejections_total{backend="default",replica="r1"} 1.0' in metrics
    finally:
        for backend in backends:
            backend.stop()


def test_every_replica_down_is_an_immediate_503(spawn: Spawn) -> None:
    backend = spawn("simulator")
    gateway = spawn("gateway", backend.url, probe_interval="0.2", eject_after="1")
    backend.stop()
    until(lambda: not _replica(gateway, "r0")["healthy"], "not ejected")
    started = time.monotonic()
    response = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body())
    assert time.monotonic() - started < 10, "at once, not after INFERENCE_TIMEOUT (60 s)"
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_healthy_backend"
    assert response.headers["retry-after"]
    assert httpx.get(gateway.url + "/health/ready").status_code == 503


def test_least_outstanding_steers_around_a_slow_replica(spawn: Spawn) -> None:
    fast, slow = spawn("simulator"), spawn("simulator", "--ttft", "0.3")
    gateway = spawn("gateway", _urls(fast, slow), lb_policy="least_outstanding")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), timeout=30).status_code,
                range(80),
            )
        )
    assert set(codes) == {200}
    on_fast, on_slow = _served(fast, slow)
    assert on_fast > 3 * on_slow, (on_fast, on_slow)


def test_round_robin_takes_turns(spawn: Spawn) -> None:
    backends = [spawn("simulator") for _ in range(3)]
    gateway = spawn("gateway", _urls(*backends), lb_policy="round_robin")
    for _ in range(9):
        assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body()).status_code == 200
    assert _served(*backends) == [3, 3, 3]


def test_prefix_affinity(spawn: Spawn) -> None:
    backends = [spawn("simulator") for _ in range(3)]
    gateway = spawn("gateway", _urls(*backends), lb_policy="prefix_affinity")
    shared = [{"role": "system", "content": "A long shared system prompt. " * 20}, {"role": "user", "content": "q"}]
    for _ in range(10):
        httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(messages=shared))
    assert sorted(_served(*backends)) == [0, 0, 10], "one prefix, one replica"
    for index in range(30):
        httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(user=f"user-{index}"))
    assert sum(1 for count in _served(*backends) if count) == 3, "distinct prefixes spread out"


def test_load_aware_follows_reported_queue_depth(spawn: Spawn) -> None:
    busy, idle = spawn("simulator", "--reported-waiting", "40"), spawn("simulator")
    gateway = spawn("gateway", _urls(busy, idle), lb_policy="load_aware", probe_interval="0.2")
    until(lambda: _replica(gateway, "r0")["load"] is not None, "load not scraped")
    for _ in range(20):
        httpx.post(gateway.url + "/v1/chat/completions", json=chat_body())
    assert _served(busy, idle) == [0, 20]
    assert (
        'inference_core_replica_load{backend="default",kind="waiting",replica="r0"} 40.0'
        in httpx.get(gateway.url + "/metrics").text
    )


def test_model_on_one_replica_is_routed_there(spawn: Spawn) -> None:
    plain, adapted = spawn("simulator"), spawn("simulator", "--lora", "only-here")
    gateway = spawn("gateway", _urls(plain, adapted))
    for _ in range(10):
        assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(model="only-here")).status_code == 200
    assert _served(plain, adapted) == [0, 10]
    models = [entry["id"] for entry in httpx.get(gateway.url + "/v1/models").json()["data"]]
    assert models == [MODEL, "only-here"], "the union of the replicas' lists"
