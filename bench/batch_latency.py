"""Interactive latency while a batch runs: does batch work take only the idle capacity?

A simulator answers every request after ``--service`` seconds (0.15, so that the batch outlasts
the run); the gateway has 40 slots and runs batch lines 32 at a time at the batch priority. A
client keeps ``--concurrency`` (8) interactive chat requests going for ``--seconds`` (20), once
alone and once while a batch of ``--lines`` (5,000) lines runs; it prints the interactive p50
and p99 of both runs, and the batch's throughput with nothing else running.

    python bench/batch_latency.py [--lines 5000] [--seconds 20] [--concurrency 8] [--database-url URL]

``--database-url postgresql://...`` keeps the batch in PostgreSQL (an empty database) instead of SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import aiohttp
import httpx
import orjson
from processes import MODEL, free_port, percentile, start, stop


def batch_file(lines: int, service: float) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "sim_fault": f"delay={service}"}  # fmt: skip
    return b"".join(
        orjson.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + b"\n"
        for i in range(lines)
    )


def submit(base: str, content: bytes) -> str:
    uploaded = httpx.post(base + "/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", content)}).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return str(httpx.post(base + "/v1/batches", json=body).json()["id"])


def wait(base: str, batch_id: str) -> dict[str, object]:
    while (batch := httpx.get(f"{base}/v1/batches/{batch_id}").json())["status"] not in ("completed", "failed"):
        time.sleep(0.5)
    return dict(batch)


async def interactive(url: str, *, seconds: float, concurrency: int, service: float) -> list[float]:
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
         "sim_fault": f"delay={service}"}
    )  # fmt: skip
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--service", type=float, default=0.15)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    backend, port = free_port(), free_port()
    simulator = start(["simulate", "--port", str(backend)], {}, f"http://127.0.0.1:{backend}/health", core=1)
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend}/v1", "INFERENCE_MODEL": MODEL,
               "INFERENCE_DATA_DIR": scratch, "INFERENCE_MAX_CONCURRENT_TASKS": "40",
               "INFERENCE_DATABASE_URL": args.database_url}  # fmt: skip
        gateway = start(["--port", str(port)], env, base + "/health/ready", core=0)
        try:
            content = batch_file(args.lines, args.service)
            started = time.monotonic()
            alone = wait(base, submit(base, content))
            elapsed = time.monotonic() - started
            print(f"batch alone: {args.lines} lines in {elapsed:.1f} s, {args.lines / elapsed:.0f} lines/s "
                  f"({alone['request_counts']})")  # fmt: skip
            url = base + "/v1/chat/completions"
            print(
                f"interactive: c={args.concurrency}, {args.seconds:g} s, each {args.service * 1000:g} ms at the backend"
            )
            print("| run | requests | p50 ms | p99 ms |\n|---|---|---|---|")
            for label, with_batch in (("alone", False), ("with a batch running", True)):
                batch_id = submit(base, content) if with_batch else None
                latencies = asyncio.run(
                    interactive(url, seconds=args.seconds, concurrency=args.concurrency, service=args.service)
                )
                running = httpx.get(f"{base}/v1/batches/{batch_id}").json()["status"] if batch_id else "-"
                print(f"| {label} | {len(latencies)} | {percentile(latencies, 0.5):.1f} | "
                      f"{percentile(latencies, 0.99):.1f} |  (batch: {running})", flush=True)  # fmt: skip
                if batch_id:
                    wait(base, batch_id)
        finally:
            stop(gateway)
            stop(simulator)


if __name__ == "__main__":
    main()
