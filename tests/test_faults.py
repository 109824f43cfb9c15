"""Backends that misbehave below HTTP: a purpose-built TCP upstream that goes silent, hangs up, or lies.

Each case checks what the client gets (status, OpenAI error body) and that the gateway is
healthy afterwards: nothing left in flight, and the next request to a good backend succeeds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SdkFor, chat_body
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server, free_port, held, metric, start_simulator, until

Spawn = Callable[..., Server]


CLOSE_DELIMITED = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": []}
EVENTS = b"".join(
    b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [{"index": 0, "delta": {"content": f"{n} "}, "finish_reason": None}]}).encode()
    + b"\n\n"
    for n in range(50)
) + b"data: [DONE]\n\n"  # fmt: skip


def _answer(stream: bool, *, gzipped: bool) -> bytes:
    """A keep-alive answer, chunked when streamed, gzip-compressed although nobody asked for it."""
    body = EVENTS if stream else json.dumps(CLOSE_DELIMITED).encode()
    kind = b"text/event-stream" if stream else b"application/json"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\n"
    if gzipped:
        body = gzip.compress(body)
        head += b"content-encoding: gzip\r\n"
    if not stream:
        return head + b"content-length: %d\r\n\r\n" % len(body) + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:40], body[40:]))
    return head + b"transfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


class BrokenUpstream:
    """A TCP server on loopback whose behaviour is one of ``MODES``."""

    MODES = ("silent", "hang_up", "truncated", "garbage", "close_delimited", "early_hints", "gzip")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        if self.mode in ("early_hints", "gzip") and b"POST" in head:
            await self._keep_alive(head, reader, writer)
            return
        if b"GET /health" in head or b"GET /version" in head:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()
            return
        if self.mode == "silent":
            await asyncio.sleep(3600)
        elif self.mode == "hang_up":
            writer.transport.abort()
        elif self.mode == "truncated":
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"id": ')
            await writer.drain()
            writer.close()
        elif self.mode == "close_delimited":
            # Valid HTTP/1.1: no length and no chunking, so the body ends where the connection does.
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
            writer.write(json.dumps(CLOSE_DELIMITED).encode())
            await writer.drain()
            writer.close()
        elif self.mode == "garbage":
            writer.write(b"this is not HTTP at all\r\n\r\n")
            await writer.drain()
            writer.close()

    async def _keep_alive(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer every request on the connection: after a 103 in a read of its own, or compressed."""
        while True:
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            stream = re.search(rb'"stream":\s*true', await reader.readexactly(length)) is not None
            if self.mode == "early_hints":
                writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(_answer(stream, gzipped=self.mode == "gzip"))
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return

    def __enter__(self) -> BrokenUpstream:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        )
        self._server = started.result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def broken(request: pytest.FixtureRequest) -> Iterator[BrokenUpstream]:
    with BrokenUpstream(request.param) as upstream:
        yield upstream


def _healthy_afterwards(gateway: Server, good: Server) -> None:
    def settled() -> bool:  # a client that left is let go of as soon as the gateway sees it leave
        metrics = httpx.get(gateway.url + "/metrics").text
        return "inference_core_in_flight 0.0" in metrics and "inference_core_queue_depth 0.0" in metrics

    until(settled, "requests still held")
    assert httpx.get(gateway.url + "/health/live").status_code == 200
    assert httpx.post(good.url + "/v1/chat/completions", json=chat_body()).status_code == 200


@pytest.mark.parametrize(
    ("broken", "status", "code", "settings"),
    [
        ("silent", 504, "backend_timeout", {"timeout": "0.5", "max_retries": "1"}),
        ("hang_up", 502, "backend_unreachable", {}),
        ("truncated", 502, "bad_upstream_response", {}),
        ("garbage", 502, None, {}),
    ],
    indirect=["broken"],
)
def test_broken_backend(
    spawn: Spawn, gateway: Server, broken: BrokenUpstream, schemas: OpenAISchemas,
    status: int, code: str | None, settings: dict[str, str],
) -> None:  # fmt: skip
    faulty = spawn("gateway", broken.url, **settings)
    for stream in (False, True):
        response = httpx.post(faulty.url + "/v1/chat/completions", json=chat_body(stream=stream), timeout=30)
        if stream and response.status_code == 200:
            # The headers had come, so the stream began: the failure is its last event.
            error = json.loads(response.text.strip().splitlines()[-1].removeprefix("data: "))
        else:
            assert response.status_code == status, response.text
            error = response.json()
        schemas.validate("ErrorResponse", error)
        if code:
            assert error["error"]["code"] == code
    _healthy_afterwards(faulty, gateway)


@pytest.mark.parametrize("broken", ["close_delimited"], indirect=True)
def test_body_delimited_by_the_connection_closing(spawn: Spawn, gateway: Server, broken: BrokenUpstream) -> None:
    faulty = spawn("gateway", broken.url)
    for _ in range(3):  # each answer takes its connection with it: the next one opens anew
        response = httpx.post(faulty.url + "/v1/chat/completions", json=chat_body(), timeout=30)
        assert response.status_code == 200, response.text
        assert response.json() == CLOSE_DELIMITED
    _healthy_afterwards(faulty, gateway)


@pytest.mark.parametrize("broken", ["early_hints", "gzip"], indirect=True)
def test_interim_and_compressed_answers_reach_the_client_plain(
    spawn: Spawn, gateway: Server, broken: BrokenUpstream, sdk_for: SdkFor
) -> None:
    """A 103 before the answer is skipped; a gzip body the gateway did not ask for arrives decoded."""
    faulty = spawn("gateway", broken.url)
    sdk = sdk_for(faulty)
    for _ in range(3):  # on one kept-alive connection: each request gets its own answer
        response = httpx.post(faulty.url + "/v1/chat/completions", json=chat_body(), timeout=30)
        assert response.status_code == 200 and "content-encoding" not in response.headers
        assert response.json() == CLOSE_DELIMITED
        with httpx.stream("POST", faulty.url + "/v1/chat/completions", json=chat_body(stream=True)) as streamed:
            assert streamed.headers["content-type"] == "text/event-stream"
            assert "content-encoding" not in streamed.headers
            assert streamed.read() == EVENTS
        chunks = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "".join(f"{n} " for n in range(50))
    _healthy_afterwards(faulty, gateway)


def test_client_leaving_while_waiting_for_the_first_byte(gateway: Server, http: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(sim_fault="delay=1"), timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(stream=True, sim_fault="delay=1"), timeout=0.3)
    _healthy_afterwards(gateway, gateway)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/json"])
def test_content_types_are_not_guessed(http: httpx.Client, content_type: str) -> None:
    """The body is JSON whatever the label says: OpenAI's SDKs always send JSON."""
    response = http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "x"}]}',
                         headers={"content-type": content_type})  # fmt: skip
    assert response.status_code == 200
    assert (
        http.post("/v1/chat/completions", content=b"a=1&b=2", headers={"content-type": content_type}).status_code == 400
    )


def test_slow_body_gets_408(spawn: Spawn, simulator: Server, schemas: OpenAISchemas) -> None:
    gateway = spawn("gateway", simulator.url, timeout="1")
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"mess')
        sock.settimeout(5)
        started = time.monotonic()
        answer = b""
        while b"}}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        assert time.monotonic() - started < 5, "408 after the 1 s timeout, not the client's own"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    schemas.validate("ErrorResponse", json.loads(body))


def test_slow_reader_throttles_the_backend(spawn: Spawn) -> None:
    backend = spawn("simulator")
    gateway = spawn("gateway", backend.url)
    body = chat_body(stream=True, n=16, max_tokens=4096, ignore_eos=True)  # ~16 MB of events
    rss_before = _rss_mb(gateway)
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        time.sleep(2)  # read nothing: socket buffers fill, and the gateway must stop reading upstream
        # The kernel's buffers on the way may hold all 16 MB (loopback receive buffers grow to
        # 32 MB here), so what this shows is the gateway's memory; tests/test_http1.py shows
        # that the client stops reading.
        assert _rss_mb(gateway) - rss_before < 40, "the gateway buffered the stream instead of pushing back"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"


def _rss_mb(server: Server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def test_backend_restart_while_requests_are_queued(spawn: Spawn, log_dir: Path) -> None:
    port = free_port()
    backend = start_simulator(log_dir, port=port)
    # Enough retries that their random (full-jitter) waits (about 20 s in all, rarely under 15 s)
    # outlast the restart, even on a busy machine.
    gateway = spawn(
        "gateway",
        backend.url,
        max_concurrent_tasks="1",
        max_retries="80",
        retry_base_delay="0.2",
        retry_max_delay="0.5",
    )
    # A stream the backend would take a minute to start: it holds the only slot until closed.
    hold = chat_body(stream=True, sim_fault="ttft=60")
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool, held(gateway, "/v1/chat/completions", hold) as busy:
            until(lambda: metric(gateway, "inference_core_in_flight") == 1, "the slot was never taken")
            answers = [pool.submit(_post_slow, gateway) for _ in range(3)]
            until(lambda: metric(gateway, "inference_core_queue_depth") == 3, "the requests never queued")
            backend.process.terminate()  # it stops listening, and ends once the held stream is let go
            busy.close()
            backend.stop()
            until(lambda: metric(gateway, "inference_core_upstream_retries_total") > 0, "no request met the gap")
            backend = start_simulator(log_dir, port=port)
            assert [future.result().status_code for future in answers] == [200, 200, 200]
    finally:
        backend.stop()


def _post_slow(gateway: Server) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(sim_fault="delay=0.3"), timeout=30)


def test_huge_response_is_relayed_whole(http: httpx.Client, gateway: Server) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(sim_fault="huge=20"))
    assert response.status_code == 200
    assert len(response.json()["choices"][0]["message"]["content"]) == 20 * 1024 * 1024
    _healthy_afterwards(gateway, gateway)
