"""Fair share between keys: a small key's queue wait while a big key's backlog fills the queue.

A simulator answers each request after ``--service`` seconds (0.2); the gateway has ``--slots``
slots (50). Key A sends ``--backlog`` requests (2,000) at once; half a second later key B sends
``--probes`` requests (20), one every 100 ms. Printed: the queue wait (``x-inference-queue-ms``)
of B's and of A's requests, p50 / p95 / max, when B is its own key (fair share: equal weights)
and when B sends with A's key (one key: first come, first served, what a gateway without
fair share does to everyone).

    python bench/fairness.py [--backlog 2000] [--slots 50] [--service 0.2] [--probes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp
import orjson
from processes import MODEL, free_port, percentile, start, stop


async def run(
    url: str, *, backlog: int, probes: int, service: float, probe_key: str
) -> tuple[list[float], list[float]]:
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
         "sim_fault": f"delay={service}"}
    )  # fmt: skip

    async def one(session: aiohttp.ClientSession, key: str) -> float:
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            assert response.status == 200, response.status
            return float(response.headers["x-inference-queue-ms"])

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        big = [asyncio.create_task(one(session, "sk-a")) for _ in range(backlog)]
        await asyncio.sleep(0.5)
        small = []
        for _ in range(probes):
            small.append(asyncio.create_task(one(session, probe_key)))
            await asyncio.sleep(0.1)
        return list(await asyncio.gather(*small)), list(await asyncio.gather(*big))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=50)
    parser.add_argument("--service", type=float, default=0.2)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    backend_port, port = free_port(), free_port()
    simulator = start(["simulate", "--port", str(backend_port)], {}, f"http://127.0.0.1:{backend_port}/health", core=1)
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "gateway.yaml"
        config.write_text(
            f"max_concurrent_tasks: {args.slots}\nqueue_timeout: 600\nmodel: {MODEL}\n"
            f"backends:\n  local:\n    base_url: http://127.0.0.1:{backend_port}/v1\n"
            "keys:\n  a:\n    key: sk-a\n  b:\n    key: sk-b\n"
        )
        ready = f"http://127.0.0.1:{port}/health/ready"
        gateway = start(["--config", str(config), "--port", str(port)], {}, ready, core=0)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print(f"A: {args.backlog} requests at once; B: {args.probes}, one per 100 ms; {args.slots} slots busy "
              f"{args.service:g} s each")  # fmt: skip
        print("| B sends as | B's queue wait p50 / p95 / max (ms) | A's queue wait p50 / p95 / max (ms) |")
        print("|---|---|---|")
        try:
            for label, key in (("its own key (fair share)", "sk-b"), ("A's key (first come, first served)", "sk-a")):
                small, big = asyncio.run(
                    run(url, backlog=args.backlog, probes=args.probes, service=args.service, probe_key=key)
                )
                figures = [" / ".join(f"{percentile(w, q):.0f}" for q in (0.5, 0.95, 1.0)) for w in (small, big)]
                print(f"| {label} | {figures[0]} | {figures[1]} |", flush=True)
        finally:
            stop(gateway)
            stop(simulator)


if __name__ == "__main__":
    main()
