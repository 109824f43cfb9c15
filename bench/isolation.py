"""A slow backend beside a fast one: does the slow one's traffic raise the fast one's queue wait?

Two simulators behind one gateway configured by a file: ``openai`` (OpenAI's dialect), whose
flood requests each take ``--slow`` seconds (10 by default), and ``local`` (vLLM) answering at once.
The gateway's total is 64 slots. A client keeps ``--concurrency`` requests going to ``local``
for ``--seconds``, once alone and once while ``--flood`` requests (200) are sent to ``openai``
at once, and prints the ``local`` requests' queue wait (``x-inference-queue-ms``) and latency,
p50 and p99, for two layouts:

- ``isolated``: ``openai`` has its own 32 slots (``max_concurrent_tasks: 32``), so its flood
  waits in its own lane;
- ``shared``: ``openai`` may take all 64 (the default: a backend's cap is the total), which is
  what one shared queue amounts to: ``local``'s requests wait behind the flood.

    python bench/isolation.py [--seconds 15] [--slow 10] [--flood 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from processes import MODEL, free_port, percentile, start, stop

LAYOUTS = {"isolated": "\n    max_concurrent_tasks: 32", "shared": ""}


def config(local: int, remote: int, layout: str) -> str:
    return (
        f"max_concurrent_tasks: 64\nqueue_timeout: 120\ntimeout: 120\nbackends:\n"
        f"  local:\n    provider: vllm\n    base_url: http://127.0.0.1:{local}/v1\n"
        f"  openai:\n    provider: openai\n    base_url: http://127.0.0.1:{remote}/v1\n    models: [gpt-4o]"
        f"{LAYOUTS[layout]}\n"
    )


async def measure(
    url: str, *, seconds: float, concurrency: int, flood: int, slowness: float
) -> tuple[list[float], list[float]]:
    """``local``'s queue waits and latencies (ms) over ``seconds``, with ``flood`` slow requests sent first."""
    fast = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
    slow = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
         "sim_fault": f"delay={slowness}"}
    )  # fmt: skip
    headers = {"content-type": "application/json"}
    waits: list[float] = []
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def post(body: bytes) -> None:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status

        flooding = [asyncio.create_task(post(slow)) for _ in range(flood)]
        await asyncio.sleep(0.5)  # the flood has taken its slots
        deadline = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=fast, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status
                    waits.append(float(response.headers["x-inference-queue-ms"]))
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        for task in flooding:
            task.cancel()
        await asyncio.gather(*flooding, return_exceptions=True)
    return waits, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--slow", type=float, default=10)
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    local_port, remote_port = free_port(), free_port()
    local = start(
        ["simulate", "--port", str(local_port), "--model", MODEL], {}, f"http://127.0.0.1:{local_port}/health", core=1
    )
    remote = start(
        ["simulate", "--port", str(remote_port), "--mode", "openai", "--model", "gpt-4o"],
        {},
        f"http://127.0.0.1:{remote_port}/health",
        core=1,
    )
    print(f"local requests at c={args.concurrency} for {args.seconds:g} s; "
          f"flood: {args.flood} requests of {args.slow:g} s")  # fmt: skip
    print("| layout | flood | local requests | queue wait p50 / p99 (ms) | latency p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for layout in LAYOUTS:
                path = Path(scratch) / f"{layout}.yaml"
                path.write_text(config(local_port, remote_port, layout))
                port = free_port()
                gateway = start(
                    ["--config", str(path), "--port", str(port)], {}, f"http://127.0.0.1:{port}/health/ready", core=0
                )
                try:
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    for flood in (0, args.flood):
                        waits, latencies = asyncio.run(
                            measure(
                                url, seconds=args.seconds, concurrency=args.concurrency, flood=flood, slowness=args.slow
                            )
                        )
                        wait, latency = (
                            f"{percentile(v, 0.5):.1f} / {percentile(v, 0.99):.1f}" for v in (waits, latencies)
                        )
                        print(f"| {layout} | {flood} | {len(waits)} | {wait} | {latency} |", flush=True)
                finally:
                    stop(gateway)
    finally:
        stop(local)
        stop(remote)


if __name__ == "__main__":
    main()
