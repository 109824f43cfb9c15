"""Balancing policies side by side: three simulator replicas of unequal speed, one load, one run.

Replicas answer after 10, 30 and 90 ms. Closed-loop clients (``--concurrency``) send chat
completions for ``--seconds`` per configuration, through inference-core with each of its
policies and through vLLM's Rust router (PyPI ``vllm-router``) with its comparable ones.
Prints req/s, p50 and p99 per configuration, and how the requests split over the replicas.
The router is installed into its own venv on first use (``~/.cache/inference-core/router-venv``).

    python bench/balancing.py [--seconds 8] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import httpx
import orjson
from processes import MODEL, free_port, router_binary, spawn, start, stop

POLICIES = ("least_outstanding", "round_robin", "load_aware", "prefix_affinity")
ROUTER_POLICIES = ("round_robin", "power_of_two", "cache_aware")
SPEEDS = (0.01, 0.03, 0.09)


async def load(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors
        # Distinct users, so that affinity policies have something to hash.
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"u{index}"}], "max_tokens": 4})
        while time.monotonic() < deadline:
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session, index) for index in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


def served(backends: list[str]) -> list[int]:
    return [httpx.get(f"{url}/_sim/stats").json()["requests"].get("/v1/chat/completions", 0) for url in backends]


def reset(backends: list[str]) -> None:
    for url in backends:
        httpx.post(f"{url}/_sim/reset")


def measure(name: str, url: str, backends: list[str], args: argparse.Namespace) -> None:
    asyncio.run(load(url, 1, args.concurrency))  # warm-up
    reset(backends)
    result = asyncio.run(load(url, args.seconds, args.concurrency))
    split = served(backends)
    share = " / ".join(f"{100 * count / max(1, sum(split)):.0f}%" for count in split)
    print(f"{name:38} {result['rps']:7.0f} {result['p50']:7.1f} {result['p99']:7.1f} {result['errors']:6.0f}  {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    processes = []
    try:
        backends = []
        for ttft in SPEEDS:
            port = free_port()
            processes.append(
                start(["simulate", "--port", str(port), "--ttft", str(ttft)], {}, f"http://127.0.0.1:{port}/health")
            )
            backends.append(f"http://127.0.0.1:{port}")
        print(f"replicas answer after {', '.join(f'{s * 1000:.0f} ms' for s in SPEEDS)}; {args.concurrency} clients")
        print(f"{'configuration':38} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  split fast/mid/slow")
        for policy in POLICIES:
            port = free_port()
            settings = {
                "INFERENCE_BASE_URL": ",".join(url + "/v1" for url in backends),
                "INFERENCE_MODEL": MODEL, "INFERENCE_PORT": str(port), "INFERENCE_HOST": "127.0.0.1",
                "INFERENCE_LOG_LEVEL": "warning", "INFERENCE_LB_POLICY": policy, "INFERENCE_PROBE_INTERVAL": "0.5",
            }  # fmt: skip
            gateway = start([], settings, f"http://127.0.0.1:{port}/health/live")
            try:
                measure(f"inference-core {policy}", f"http://127.0.0.1:{port}/v1/chat/completions", backends, args)
            finally:
                stop(gateway)
        binary = router_binary()
        for policy in ROUTER_POLICIES:
            port = free_port()
            router = spawn(
                [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                 "--worker-urls", *backends, "--log-level", "error"],
                f"http://127.0.0.1:{port}/health",
            )  # fmt: skip
            try:
                measure(f"vllm-router {policy}", f"http://127.0.0.1:{port}/v1/chat/completions", backends, args)
            finally:
                stop(router)
    finally:
        for process in processes:
            process.terminate()


if __name__ == "__main__":
    main()
