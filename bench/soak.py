"""Soak: mixed traffic through the gateway for a set time, printing RSS and open descriptors.

The mix: plain chat, whole streams, streams the client abandons half-way, requests whose
client gives up while waiting, backend errors that are retried, and malformed requests. Every
``--every`` seconds a line gives the gateway's RSS, open file descriptors and requests so far.
Exits non-zero if an answer was not what its kind should get, or if RSS or descriptors kept
growing over the last half of the run (compared with the first sample of that half).

    python bench/soak.py [--minutes 30] [--concurrency 32] [--pause 0]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter

import aiohttp
import orjson
from processes import MODEL, free_port, gateway_settings, open_fds, rss_mb, start

#: RSS may grow this much over the second half before the run counts as leaking.
RSS_SLACK_MB = 15
FD_SLACK = 20


def body(**extra: object) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "soak"}], "max_tokens": 12, **extra})


async def one(session: aiohttp.ClientSession, url: str, kind: str, tally: Counter[str]) -> None:
    headers = {"content-type": "application/json"}
    try:
        if kind == "chat":
            async with session.post(url, data=body(), headers=headers) as response:
                await response.read()
                ok = response.status == 200
        elif kind == "stream":
            async with session.post(url, data=body(stream=True), headers=headers) as response:
                ok = (await response.read()).rstrip().endswith(b"data: [DONE]")
        elif kind == "abandoned_stream":
            async with session.post(url, data=body(stream=True, sim_fault="itl=0.05"), headers=headers) as response:
                await response.content.readline()
                ok = response.status == 200  # leaving here closes the connection mid-stream
        elif kind == "impatient":
            try:
                timeout = aiohttp.ClientTimeout(total=0.1)
                async with session.post(url, data=body(sim_fault="delay=0.5"), headers=headers, timeout=timeout):
                    ok = False
            except TimeoutError:
                ok = True
        elif kind == "retried":
            tag = random.getrandbits(64)
            async with session.post(url, data=body(sim_fault=f"status=503,times=1,tag={tag}"), headers=headers) as r:
                await r.read()
                ok = r.status == 200 and r.headers.get("x-inference-retries") == "1"
        else:  # malformed
            async with session.post(url, data=b'{"messages": "nope"', headers=headers) as response:
                await response.read()
                ok = response.status == 400
    except aiohttp.ClientError:
        ok = False
    tally[kind if ok else f"{kind}_WRONG"] += 1


KINDS = ["chat"] * 4 + ["stream"] * 2 + ["abandoned_stream", "impatient", "retried", "malformed"]


async def traffic(url: str, concurrency: int, seconds: float, pause: float, tally: Counter[str]) -> None:
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                await one(session, url, random.choice(KINDS), tally)
                await asyncio.sleep(pause)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def sample(
    pid: int, seconds: float, every: float, tally: Counter[str], rows: list[tuple[float, float, int]]
) -> None:
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds + every / 2:
        rss, fds = rss_mb(pid), open_fds(pid)
        rows.append((elapsed, rss, fds))
        print(f"{elapsed:7.0f}s  rss {rss:6.1f} MB  fds {fds:4d}  requests {sum(tally.values()):7d}", flush=True)
        await asyncio.sleep(every)


async def run(url: str, pid: int, args: argparse.Namespace) -> int:
    tally: Counter[str] = Counter()
    rows: list[tuple[float, float, int]] = []
    seconds = args.minutes * 60 if args.seconds is None else args.seconds
    await asyncio.gather(
        traffic(url, args.concurrency, seconds, args.pause, tally), sample(pid, seconds, args.every, tally, rows)
    )
    await asyncio.sleep(1)  # let abandoned upstream work wind down
    print("answers:", dict(sorted(tally.items())))
    half = rows[len(rows) // 2 :]
    rss_growth = max(r[1] for r in half) - half[0][1]
    fd_growth = open_fds(pid) - half[0][2]
    print(f"second half: RSS grew {rss_growth:.1f} MB, descriptors {fd_growth:+d} (now {open_fds(pid)})")
    wrong = sum(count for kind, count in tally.items() if kind.endswith("_WRONG"))
    leaking = rss_growth > RSS_SLACK_MB or fd_growth > FD_SLACK
    print("verdict:", "LEAKING" if leaking else "levelled off", f"/ {wrong} unexpected answers")
    return 1 if leaking or wrong else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seconds", type=float, help="run length in seconds (overrides --minutes)")
    parser.add_argument("--every", type=float, default=30, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each client waits between requests")
    args = parser.parse_args()
    sim_port, gw_port = free_port(), free_port()
    simulator = start(
        ["simulate", "--port", str(sim_port), "--itl", "0.002"], {}, f"http://127.0.0.1:{sim_port}/health"
    )
    settings = gateway_settings(sim_port, gw_port, retry_base_delay="0.01")
    gateway = start([], settings, f"http://127.0.0.1:{gw_port}/health/live")
    try:
        code = asyncio.run(run(f"http://127.0.0.1:{gw_port}/v1/chat/completions", gateway.pid, args))
    finally:
        gateway.terminate()
        simulator.terminate()
    sys.exit(code)


if __name__ == "__main__":
    main()
