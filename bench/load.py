"""The brief's capacity claims against the simulator: 500+ streams in flight, 10,000 queued.

1. ``--streams`` (default 600) concurrent SSE streams, each ``--tokens`` tokens at ``--itl``
   seconds apart: every stream must end with ``[DONE]`` and the right number of tokens.
2. ``--queued`` (default 10,000) requests beyond ``--in-flight`` (default 500) slow ones
   (``--delay`` seconds each), so that many wait in the gateway's queue: every one must be
   answered 200. The queue-wait distribution comes from the ``x-inference-queue-ms`` header.

Prints the gateway's peak RSS (VmHWM) after each phase.

    python bench/load.py [--streams 600] [--queued 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

import aiohttp
import orjson
from processes import MODEL, free_port, gateway_settings, peak_rss_mb, start


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return f"p50 {at(0.5):.0f}  p90 {at(0.9):.0f}  p99 {at(0.99):.0f}  max {ordered[-1]:.0f}"


async def streams(url: str, count: int, tokens: int, itl: float) -> None:
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": tokens, "stream": True,
         "sim_fault": f"itl={itl}", "ignore_eos": True}
    )  # fmt: skip
    ok = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            text = (await response.read()).decode()
        events = [line for line in text.splitlines() if line.startswith("data: ")]
        contents = [e for e in events if '"content":"' in e and '"role"' not in e]
        if response.status == 200 and events[-1] == "data: [DONE]" and len(contents) == tokens:
            ok += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(count)))
    print(f"streams: {ok}/{count} complete and correct in {time.monotonic() - started:.1f}s")


async def queued(url: str, in_flight: int, extra: int, delay: float) -> list[float]:
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "sim_fault": f"delay={delay}"}
    )
    waits: list[float] = []
    statuses: dict[int, int] = {}

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            await response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 200:
                waits.append(float(response.headers["x-inference-queue-ms"]))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        started = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(in_flight + extra)))
    elapsed = time.monotonic() - started
    print(f"queue: {statuses.get(200, 0)}/{in_flight + extra} answered 200 in {elapsed:.1f}s; statuses {statuses}")
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=600)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--itl", type=float, default=0.05)
    parser.add_argument("--in-flight", type=int, default=500)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=1.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sim_port, gw_port = free_port(), free_port()
    simulator = start(["simulate", "--port", str(sim_port)], {}, f"http://127.0.0.1:{sim_port}/health")
    slots = str(max(args.in_flight, args.streams))
    settings = gateway_settings(
        sim_port,
        gw_port,
        # HTTP/1.1: every stream in flight needs its own upstream connection.
        max_connections=slots,
        max_concurrent_tasks=slots,
        queue_size=str(args.queued + args.in_flight),
        queue_timeout="600",
        timeout="600",
    )
    gateway = start([], settings, f"http://127.0.0.1:{gw_port}/health/live")
    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    try:
        print(f"gateway RSS at start: {peak_rss_mb(gateway.pid):.0f} MB")
        asyncio.run(streams(url, args.streams, args.tokens, args.itl))
        print(f"gateway peak RSS after streams: {peak_rss_mb(gateway.pid):.0f} MB")
        # Restart so that the queue phase's peak RSS is its own.
        gateway.terminate()
        gateway.wait()
        settings["INFERENCE_MAX_CONNECTIONS"] = settings["INFERENCE_MAX_CONCURRENT_TASKS"] = str(args.in_flight)
        gateway = start([], settings, f"http://127.0.0.1:{gw_port}/health/live")
        waits = asyncio.run(queued(url, args.in_flight, args.queued, args.delay))
        print(f"gateway peak RSS with {args.queued} queued: {peak_rss_mb(gateway.pid):.0f} MB")
        print(f"queue wait ms: {percentiles(waits)}  (mean {statistics.mean(waits):.0f})")
    finally:
        gateway.terminate()
        simulator.terminate()


if __name__ == "__main__":
    main()
