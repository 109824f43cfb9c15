"""Two gateways, one real Redis: a key's limits are the key's, not each replica's; Redis away and back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import FAST_RETRIES, MODEL
from tests.packages import Unavailable, debian_tool
from tests.servers import Server, free_port, held, start_fleet, start_simulator, until

KEY = "sk-shared-7d1e0c"


#: Installing redis-server may wait for another apt-get: that wait is not the tests' time.
pytestmark = pytest.mark.timeout(func_only=True)


def redis_binary() -> str:
    """Debian's redis-server, installed when missing (the tests need a real one)."""
    try:
        return debian_tool("redis-server", "redis-server")
    except Unavailable as missing:
        pytest.skip(f"these tests need a real redis-server: {missing}")


class Redis:
    """A redis-server on a free loopback port, in a temporary folder, without persistence."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout != b"PONG\n":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def simulator(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir)
    yield server
    server.stop()


def gateways(
    log_dir: Path, tmp_path: Path, simulator: Server, redis: Redis, *, count: int = 2, **settings: str
) -> list[Server]:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"limit_window: 3600\nmodel: {MODEL}\nbackends:\n  local: {{base_url: {simulator.url}/v1}}\n"
        f"keys:\n  team:\n    key: {KEY}\n    rpm: 10\n"
    )
    return [start_fleet(log_dir, config, redis_url=redis.url, **(FAST_RETRIES | settings)) for _ in range(count)]


def chat(gateway: Server) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY}, timeout=30)
    return response.status_code


def redis_up(gateway: Server) -> str:
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith("inference_core_redis_up "):
            return line.split()[1]
    raise AssertionError("no inference_core_redis_up")


def test_two_gateways_share_a_key_s_requests_per_window(
    log_dir: Path, tmp_path: Path, simulator: Server, redis_server: Redis
) -> None:
    first, second = gateways(log_dir, tmp_path, simulator, redis_server)
    try:
        statuses = [chat(gateway) for _ in range(10) for gateway in (first, second)]
        assert statuses.count(200) == 10 and statuses.count(429) == 10  # 10 in all, not 10 each
        usage = httpx.get(second.url + "/v1/usage", headers={"x-api-key": KEY}).json()["data"][0]
        assert usage["current"]["requests"] == 10
        assert redis_up(first) == "1.0"
    finally:
        first.stop()
        second.stop()
    assert KEY not in first.output and "redis://" not in first.output


def test_redis_away_fails_open_then_shares_again(
    log_dir: Path, tmp_path: Path, simulator: Server, redis_server: Redis
) -> None:
    first, second = gateways(log_dir, tmp_path, simulator, redis_server)
    try:
        assert [chat(first), chat(second)] == [200, 200]
        redis_server.stop()
        # Each gateway now applies the limit alone, from its own counts: 10 each.
        statuses = [chat(gateway) for _ in range(11) for gateway in (first, second)]
        assert statuses.count(200) == 20 and statuses.count(429) == 2
        assert redis_up(first) == "0.0" and redis_up(second) == "0.0"
        redis_server.start()  # the same port, empty: its counts were lost with it
        time.sleep(1.2)  # a gateway asks Redis again a second after a failure
        assert [chat(first), chat(second)] == [200, 200]
        usage = httpx.get(second.url + "/v1/usage", headers={"x-api-key": KEY}).json()["data"][0]
        assert usage["current"]["requests"] == 2  # counted in Redis, by both
        assert redis_up(first) == "1.0"
    finally:
        first.stop()
        second.stop()
    assert "redis unreachable" in first.output and "redis reachable again" in first.output


def test_redis_away_fails_closed_when_asked(
    log_dir: Path, tmp_path: Path, simulator: Server, redis_server: Redis
) -> None:
    (gateway,) = gateways(log_dir, tmp_path, simulator, redis_server, count=1, redis_failure="closed")
    try:
        assert chat(gateway) == 200
        redis_server.stop()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
        assert "retry-after" in refused.headers
    finally:
        gateway.stop()


def fleet_of(log_dir: Path, tmp_path: Path, text: str, redis: Redis, count: int = 2) -> list[Server]:
    config = tmp_path / "shared.yaml"
    config.write_text(text)
    return [start_fleet(log_dir, config, redis_url=redis.url, **FAST_RETRIES) for _ in range(count)]


def test_a_stored_response_is_found_through_any_gateway(
    log_dir: Path, tmp_path: Path, redis_server: Redis, spawn: Callable[..., Server]
) -> None:
    replicas = [spawn("simulator"), spawn("simulator")]
    roots = ", ".join(f"{replica.url}/v1" for replica in replicas)
    text = f"model: {MODEL}\nbackends:\n  local: {{base_url: [{roots}], lb_policy: round_robin}}\n"
    first, second = fleet_of(log_dir, tmp_path, text, redis_server)
    try:
        with openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0) as sdk:
            ids = [sdk.responses.create(model=MODEL, input=f"Hello {i}").id for i in range(10)]
        with openai.OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0) as sdk:
            assert [sdk.responses.retrieve(response_id).id for response_id in ids] == ids
            follow = sdk.responses.create(model=MODEL, input="More", previous_response_id=ids[3])
            assert follow.id
    finally:
        first.stop()
        second.stop()


def test_a_key_s_concurrency_is_shared(
    log_dir: Path, tmp_path: Path, redis_server: Redis, spawn: Callable[..., Server]
) -> None:
    backend = spawn("simulator")
    # Its rpm counts each request in Redis as it is admitted, before it waits for the key's slot.
    text = (
        f"model: {MODEL}\nbackends:\n  local: {{base_url: {backend.url}/v1}}\n"
        f"keys:\n  team:\n    key: {KEY}\n    max_concurrent: 1\n    rpm: 1000\n"
    )
    first, second = fleet_of(log_dir, tmp_path, text, redis_server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    hold = {**body, "stream": True, "sim_fault": "ttft=60"}  # answered only once the test lets go

    def chats() -> int:
        return int(httpx.get(backend.url + "/_sim/stats").json()["requests"].get("/v1/chat/completions", 0))

    def admitted() -> int:  # counted in Redis, by both gateways
        usage = httpx.get(second.url + "/v1/usage", headers={"x-api-key": KEY}).json()["data"][0]
        return int(usage["current"]["requests"])

    try:
        with ThreadPoolExecutor(1) as pool:
            with held(first, "/v1/chat/completions", hold, headers={"x-api-key": KEY}) as busy:
                until(lambda: chats() == 1, "the first gateway's request never reached the backend")
                waiting = pool.submit(
                    httpx.post, second.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY}, timeout=30
                )
                until(lambda: admitted() == 2, "the second gateway never admitted its request")
                assert chats() == 1, "it waits for the slot the first gateway holds"
                time.sleep(0.5)  # held half a second more: its wait can be no shorter, however slow the machine
                busy.close()
            answer = waiting.result()
        assert answer.status_code == 200 and float(answer.headers["x-inference-queue-ms"]) >= 500
    finally:
        first.stop()
        second.stop()


def test_a_backend_s_rate_limit_is_the_total_of_every_gateway(
    log_dir: Path, tmp_path: Path, simulator: Server, redis_server: Redis
) -> None:
    block = f"{{base_url: {simulator.url}/v1, rate_limit_rps: 5, rate_limit_burst: 1}}"
    text = f"model: {MODEL}\nbackends:\n  local: {block}\n"
    first, second = fleet_of(log_dir, tmp_path, text, redis_server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            answers = list(
                pool.map(
                    lambda i: httpx.post((first, second)[i % 2].url + "/v1/chat/completions", json=body, timeout=30),
                    range(10),
                )
            )
        elapsed = time.monotonic() - started
        assert [a.status_code for a in answers] == [200] * 10
        assert elapsed >= 1.5  # 10 sends at 5 per second in all: the last after 1.8 s (alone: 5 each, 0.8 s)
    finally:
        first.stop()
        second.stop()
