"""Which HTTP client should carry the gateway's upstream traffic? Its own, aiohttp and httpx.

A tiny fixed-answer HTTP server (raw asyncio, pinned to core 1) stands in for the backend so the
client's own cost dominates. Each client, pinned to core 0, sends the same POSTs at concurrency 1
and 64 over keep-alive connections; we report req/s, p50/p99 latency and CPU time per request
(process CPU from the kernel, robust to noise). Medians of --runs runs.

    python bench/upstream_clients.py [--requests 4000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson

from inference_core.upstream.http1 import HTTP1Transport

BODY = orjson.dumps(
    {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 20}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25},
    }
)  # fmt: skip
REQUEST = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 20})
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


async def serve_fixed(port: int) -> None:
    """An HTTP/1.1 keep-alive server answering every request with RESPONSE."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def drive(send: Callable[[], Awaitable[None]], total: int, concurrency: int) -> tuple[float, list[float], float]:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - started)

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, time.process_time() - cpu


async def run_client(name: str, url: str, total: int, concurrency: int) -> dict[str, float]:
    headers = {"content-type": "application/json"}
    if name == "inference-core":
        transport = HTTP1Transport(url.rsplit("/", 2)[0], idle_connections=100, timeout=30)
        await transport.start()

        async def send() -> None:
            response = await transport.request("POST", "chat/completions", headers=headers, body=REQUEST)
            await response.read()

        await drive(send, 200, concurrency)
        elapsed, latencies, cpu = await drive(send, total, concurrency)
        await transport.aclose()
    elif name == "aiohttp":
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

            async def send() -> None:
                async with session.post(url, data=REQUEST, headers=headers) as response:
                    await response.read()

            await drive(send, 200, concurrency)  # warm the pool
            elapsed, latencies, cpu = await drive(send, total, concurrency)
    else:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits) as client:

            async def send() -> None:
                response = await client.post(url, content=REQUEST, headers=headers)
                await response.aread()

            await drive(send, 200, concurrency)
            elapsed, latencies, cpu = await drive(send, total, concurrency)
    latencies.sort()
    return {
        "rps": total / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "cpu_us": cpu / total * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_fixed(args.serve))
        return
    if args.client:
        import uvloop

        url = os.environ["BENCH_URL"]
        result = uvloop.run(run_client(args.client, url, args.requests, args.concurrency))
        print(orjson.dumps(result).decode())
        return

    port = 18765
    server = subprocess.Popen(["taskset", "-c", "1", sys.executable, __file__, "--serve", str(port)])
    time.sleep(1)
    try:
        print(f"{'client':14} {'c':>3} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>11}")
        for concurrency in (1, 64):
            for client in ("inference-core", "aiohttp", "httpx"):
                runs = []
                for _ in range(args.runs):
                    out = subprocess.run(
                        ["taskset", "-c", "0", sys.executable, __file__, "--client", client,
                         "--requests", str(args.requests), "--concurrency", str(concurrency)],
                        capture_output=True, text=True, check=True,
                        env={**os.environ, "BENCH_URL": f"http://127.0.0.1:{port}/v1/chat/completions"},
                    ).stdout  # fmt: skip
                    runs.append(orjson.loads(out))
                median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                print(
                    f"{client:14} {concurrency:>3} {median['rps']:>8.0f} {median['p50_ms']:>7.2f} "
                    f"{median['p99_ms']:>7.2f} {median['cpu_us']:>11.0f}"
                )
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
