"""Two real vLLM replicas behind one gateway: stopping one mid-traffic loses no request."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, start_gateway, until
from tests.vllm.conftest import MODEL

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
