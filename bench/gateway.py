"""The gateway's added latency and throughput, against the simulator alone, measured side by side.

The simulator (pinned to core 1) answers a chat completion, plain or as a 20-chunk SSE stream;
wrk (core 1) drives it directly and through the gateway (core 0), keep-alive, at concurrency 1
and 64. Reports req/s, p50/p99 latency, the latency the gateway adds, and the gateway's CPU time
per request (from /proc, robust to noise). Medians of --runs runs of --seconds each.

    python bench/gateway.py [--seconds 5] [--runs 3]

Needs wrk (Debian package ``wrk``) and ``taskset``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from processes import MODEL, cpu_seconds, free_port, start

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 20%s}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    assert match, out
    requests, duration_us, p50_us, p99_us, errors = map(int, match.groups())
    assert errors == 0, f"{errors} errors:\n{out}"
    return {"requests": requests, "rps": requests / (duration_us / 1e6), "p50": p50_us / 1000, "p99": p99_us / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    sim_port, gw_port = free_port(), free_port()
    simulator = start(["simulate", "--port", str(sim_port)], {}, f"http://127.0.0.1:{sim_port}/health", core=1)
    gateway = start(
        ["--port", str(gw_port), "--host", "127.0.0.1", "--log-level", "warning"],
        {"INFERENCE_BASE_URL": f"http://127.0.0.1:{sim_port}/v1", "INFERENCE_MODEL": MODEL},
        f"http://127.0.0.1:{gw_port}/health/live",
        core=0,
    )
    targets = {"simulator": sim_port, "gateway": gw_port}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            scripts = {}
            for kind, extra in (("json", ""), ("sse", ', "stream": true')):
                scripts[kind] = Path(scratch) / f"{kind}.lua"
                scripts[kind].write_text(LUA % (MODEL, extra))
            print(f"{'body':5} {'c':>3} {'target':10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'added p50':>9} "
                  f"{'gw CPU µs/req':>13}")  # fmt: skip
            for kind, script in scripts.items():
                for connections in (1, 64):
                    medians: dict[str, dict[str, float]] = {}
                    for target, port in targets.items():
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        wrk(url, script, connections, 1)  # warm-up
                        runs = []
                        for _ in range(args.runs):
                            cpu = cpu_seconds(gateway.pid)
                            result = wrk(url, script, connections, args.seconds)
                            result["cpu_us"] = (cpu_seconds(gateway.pid) - cpu) / result["requests"] * 1e6
                            runs.append(result)
                        medians[target] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                    for target, m in medians.items():
                        added = m["p50"] - medians["simulator"]["p50"]
                        cpu = f"{m['cpu_us']:>13.0f}" if target == "gateway" else f"{'':>13}"
                        print(
                            f"{kind:5} {connections:>3} {target:10} {m['rps']:>8.0f} {m['p50']:>7.2f} "
                            f"{m['p99']:>7.2f} {added:>+9.2f} {cpu}"
                        )
    finally:
        gateway.terminate()
        simulator.terminate()


if __name__ == "__main__":
    main()
