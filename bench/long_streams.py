"""Many long, paced streams: the inter-chunk delay the gateway adds, and its CPU and memory.

A paced SSE backend answers every chat request with ``--tokens`` chunks, ``--itl`` seconds
apart, each stream on its own phase (as streams from several replicas would be). One clock
drives all streams, writing whatever is due each millisecond: the simulator's timer per stream
cannot keep 100,000 events a second on time on one core, and a late backend would hide the
gateway's own delay. A client opens N streams (started over one second) directly and then
through the gateway, notes when each event arrives, and reports the gaps between consecutive
events of a stream: p50 and p99 direct, through the gateway, and the difference; the gateway's
CPU (cores busy, and µs per relayed event) and its peak RSS. The gateway runs with its defaults
(queue, metrics, JSON access log to a file) on core 0, with ``INFERENCE_MAX_CONCURRENT_TASKS``
and ``INFERENCE_MAX_CONNECTIONS`` raised to the largest N; backend and client share core 1.

    python bench/long_streams.py [--streams 500,1000,2000] [--itl 0.02] [--tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson
import uvloop
from processes import MODEL, cpu_seconds, free_port, peak_rss_mb, spawn, stop

RESOLUTION = 0.001
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


def chunk(data: bytes) -> bytes:
    """``data`` as one piece of a chunked HTTP body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(content: str, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish, "logprobs": None}],
    }  # fmt: skip
    return chunk(b"data: " + orjson.dumps(body) + b"\n\n")


class PacedBackend(asyncio.Protocol):
    """One backend connection: GETs get small JSON answers, a POST gets a paced stream."""

    clock: Clock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        if head.startswith(b"GET"):
            body = MODELS if b" /v1/models " in head else b'{"version":"0.12.0"}'
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))  # fmt: skip
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        self.clock.add(self.transport)


class Clock:
    """Writes every stream's next event when it is due, checking each millisecond."""

    def __init__(self, tokens: int, itl: float) -> None:
        self.tokens = tokens
        self.itl = itl
        self.due: list[tuple[float, int, asyncio.Transport, int]] = []
        self.order = 0
        self.token = event(" token")
        self.last = event("", "length") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    def add(self, transport: asyncio.Transport) -> None:
        self.order += 1
        heapq.heappush(self.due, (time.monotonic() + self.itl, self.order, transport, 0))

    def tick(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            at, order, transport, sent = heapq.heappop(self.due)
            if transport.is_closing():
                continue
            if sent + 1 < self.tokens:
                transport.write(self.token)
                heapq.heappush(self.due, (at + self.itl, order, transport, sent + 1))
            else:
                transport.write(self.token + self.last)
        asyncio.get_running_loop().call_later(RESOLUTION, self.tick)


async def serve(port: int, tokens: int, itl: float) -> None:
    clock = Clock(tokens, itl)
    PacedBackend.clock = clock
    server = await asyncio.get_running_loop().create_server(PacedBackend, "127.0.0.1", port, backlog=4096)
    clock.tick()
    await server.serve_forever()


class StreamClient(asyncio.Protocol):
    """One stream: sends the request, then notes the gap before each event that arrives."""

    def __init__(self, request: bytes, gaps: list[float], done: asyncio.Future[int]) -> None:
        self.request = request
        self.gaps = gaps
        self.done = done
        self.last: float | None = None
        self.events = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        count = data.count(b"data: ")
        if count:
            if self.last is not None:
                self.gaps.append(now - self.last)
                self.gaps.extend([0.0] * (count - 1))  # arrived together: no gap between them
            self.last = now
            self.events += count
        if b"[DONE]" in data and not self.done.done():
            self.done.set_result(self.events)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.events)


async def run_streams(port: int, count: int, tokens: int) -> list[float]:
    """``count`` streams, started evenly over one second; the gaps between events of each."""
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens,
                         "stream": True})  # fmt: skip
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    gaps: list[float] = []
    finished: list[asyncio.Future[int]] = []
    started = loop.time()
    for index in range(count):
        done: asyncio.Future[int] = loop.create_future()
        finished.append(done)
        await loop.create_connection(lambda done=done: StreamClient(request, gaps, done), "127.0.0.1", port)  # type: ignore[misc]
        delay = started + (index + 1) / count - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    events = await asyncio.gather(*finished)
    short = sum(1 for got in events if got < tokens + 1)
    assert not short, f"{short} of {count} streams ended early"
    return gaps


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="500,1000,2000")
    parser.add_argument("--itl", type=float, default=0.02)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # run as the paced backend on this port
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.tokens, args.itl))
        return
    levels = [int(level) for level in args.streams.split(",")]
    os.sched_setaffinity(0, {1})
    backend_port, gateway_port = free_port(), free_port()
    backend = spawn([sys.executable, __file__, "--serve", str(backend_port), "--tokens", str(args.tokens),
                     "--itl", str(args.itl)], f"http://127.0.0.1:{backend_port}/health", core=1)  # fmt: skip
    most = str(max(levels))
    env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend_port}/v1", "INFERENCE_MODEL": MODEL,
           "INFERENCE_MAX_CONCURRENT_TASKS": most, "INFERENCE_MAX_CONNECTIONS": most}  # fmt: skip
    print(f"{args.tokens} tokens per stream, {args.itl * 1000:.0f} ms apart; gaps between events in ms")
    print(f"{'streams':>7} {'direct p50':>10} {'p99':>7} {'gateway p50':>11} {'p99':>7} {'added p50':>9} "
          f"{'added p99':>9} {'gw cores':>8} {'µs/event':>8} {'peak RSS MB':>11}")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "gateway.log", "wb") as log:
        command = [sys.executable, "-m", "inference_core", "--host", "127.0.0.1", "--port", str(gateway_port)]
        gateway = spawn(command, f"http://127.0.0.1:{gateway_port}/health/ready", env=env, core=0, log=log)
        try:
            for count in levels:
                direct = uvloop.run(run_streams(backend_port, count, args.tokens))
                cpu, began = cpu_seconds(gateway.pid), time.monotonic()
                through = uvloop.run(run_streams(gateway_port, count, args.tokens))
                cores = (cpu_seconds(gateway.pid) - cpu) / (time.monotonic() - began)
                per_event = (cpu_seconds(gateway.pid) - cpu) / (count * (args.tokens + 1)) * 1e6
                d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
                g50, g99 = percentile(through, 0.5), percentile(through, 0.99)
                print(f"{count:>7} {d50:>10.2f} {d99:>7.2f} {g50:>11.2f} {g99:>7.2f} {g50 - d50:>+9.2f} "
                      f"{g99 - d99:>+9.2f} {cores:>8.2f} {per_event:>8.1f} {peak_rss_mb(gateway.pid):>11.0f}",
                      flush=True)  # fmt: skip
        finally:
            stop(gateway)
            stop(backend)


if __name__ == "__main__":
    main()
