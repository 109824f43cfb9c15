"""Two real vLLM replicas behind one gateway: cache-aware routing on their KV events, and stopping one
mid-traffic loses no request."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, metric, start_gateway, until
from tests.vllm.conftest import MODEL, Replica

pytestmark = pytest.mark.vllm


def test_previous_response_id_over_two_replicas(vllm_chat: Server, vllm_chat_replica: Server, log_dir: Path) -> None:
    """Each vLLM stores its responses in its own memory; the chain must stay on the replica that made it."""
    urls = f"{vllm_chat.url},{vllm_chat_replica.url}"
    gateway = start_gateway(log_dir, urls, model=MODEL, lb_policy="round_robin")
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
            previous = None
            for turn in range(10):
                response = sdk.responses.create(
                    model=MODEL, input=f"Turn {turn}", max_output_tokens=8, previous_response_id=previous
                )
                assert response.previous_response_id == previous
                previous = response.id
            assert sdk.responses.retrieve(previous).id == previous
    finally:
        gateway.stop()


def test_cache_aware_routes_on_the_replicas_own_kv_events(
    vllm_chat: Replica, vllm_chat_replica: Replica, tiny_model: Path, log_dir: Path
) -> None:
    """Requests sharing a long prefix go where vLLM reported caching it, tokenized as vLLM tokenizes."""
    gateway = start_gateway(
        log_dir, f"{vllm_chat.url},{vllm_chat_replica.url}", model=MODEL, lb_policy="cache_aware",
        kv_events=f"{vllm_chat.kv_events},{vllm_chat_replica.kv_events}",
        kv_replay=f"{vllm_chat.kv_replay},{vllm_chat_replica.kv_replay}",
        tokenizer=str(tiny_model / "model"), probe_interval="1",
    )  # fmt: skip

    def kv_index() -> list[dict[str, object]]:
        return [r["kv_index"] for r in httpx.get(gateway.url + "/health").json()["replicas"]]

    def hits() -> float:
        return sum(metric(replica, "vllm:prefix_cache_hits_total") for replica in (vllm_chat, vllm_chat_replica))

    system = "You answer questions about the standard library's modules, briefly and exactly. " * 12
    try:
        until(lambda: all(i["events"] == "up" for i in kv_index()), "subscribed to both replicas", seconds=60)
        before = hits()
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            for number in range(6):
                body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Q{number}"}],
                        "max_tokens": 4}  # fmt: skip
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                if number == 0:
                    until(lambda: sum(int(str(i["blocks"])) for i in kv_index()) > 0, "vLLM's BlockStored arrived")
        until(lambda: hits() > before, "vLLM counted prefix-cache hits", seconds=30)
    finally:
        gateway.stop()
    routed = [json.loads(line) for line in gateway.output.splitlines() if '"cached_blocks"' in line]
    assert len(routed) == 6 and routed[0]["cached_blocks"] == 0
    assert all(line["cached_blocks"] >= 1 for line in routed[1:]), routed  # the system prompt's blocks, believed held
    assert '"kv events down' not in gateway.output


def test_failover_when_a_replica_stops(vllm_chat: Server, vllm_chat_replica: Server, log_dir: Path) -> None:
    urls = f"{vllm_chat.url},{vllm_chat_replica.url}"
    gateway = start_gateway(log_dir, urls, model=MODEL, probe_interval="0.5", eject_after="2")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/chat/completions", json=body).status_code)

    def replicas() -> list[dict[str, object]]:
        return httpx.get(gateway.url + "/health").json()["replicas"]  # type: ignore[no-any-return]

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = [pool.submit(traffic) for _ in range(2)]
            until(lambda: len(statuses) > 10, "no traffic", seconds=120)
            vllm_chat_replica.stop()
            until(lambda: not replicas()[1]["healthy"], "the stopped replica was never ejected", seconds=60)
            ejected = len(statuses)
            until(lambda: len(statuses) > ejected + 10, "no traffic after the ejection", seconds=120)
            stop.set()
            for future in running:
                future.result()
        healthy = [replica["healthy"] for replica in replicas()]
    finally:
        gateway.stop()
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    assert healthy == [True, False]
