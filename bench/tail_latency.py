"""Tail latency under concurrency: time to first token and inter-token latency, direct and through the gateway.

The simulator (``inference-core simulate --ttft --itl``) answers; aiperf (PyPI, pinned below)
drives it straight (``direct``) and through the gateway (``gateway``), started as users start it:
``inference-core`` with ``INFERENCE_BASE_URL``, ``INFERENCE_MODEL``, ``INFERENCE_PORT`` and
``INFERENCE_HOST``, everything else at its default (queue, metrics, the JSON access log, here to
a file). Two workloads: chat completions streamed at concurrency 16 (``ignore_eos``, so every
stream has ``--tokens`` tokens ``--itl`` apart after ``--ttft``) and Anthropic's Messages API
(``/v1/messages``, which the gateway passes through to the backend) streamed at concurrency 4
(the simulator sends those events unpaced).

First, one unrecorded round sends each workload to every target (``--warmup-requests``): a
freshly started server's one-off costs (its first connections, code run for the first time, the
simulator's first full garbage collection, a ~45 ms pause a hundred requests in) would otherwise
land in whichever target is measured first. Then each run measures each workload on every target
back to back, in alternating order (ABBA), each after waiting for a quiet machine. A figure is
the median over ``--runs`` runs of: time to first token p50/p90/p99 over the run's requests, and
inter-token latency p50/p99 over every gap between two consecutive chunks of a stream. ``noise``
is the CPU (in cores) that anything but the benchmark's own processes used during the
measurement; the last column is how long, on average, the gateway waited runnable for a core
each time it got one (``/proc/PID/schedstat``): a few µs when it has a core to itself, hundreds
when it shares one, where every process in the path waits its turn.

By default the gateway runs on core 0 and the simulator and aiperf share core 1, as in
``compare.py``; ``--no-pin`` lets the kernel place them (aiperf then takes over a core of its
own). ``--variant-env`` starts a second gateway with one setting changed, measured in the same
alternation, to toggle one thing at a time.

    python bench/tail_latency.py [--runs 5] [--requests 1000] [--ttft 0.02] [--itl 0.01] [--no-pin]
    python bench/tail_latency.py --variant-env INFERENCE_ACCESS_LOG=false   # also a gateway without access log

aiperf is installed on first use into its own venv under ``~/.cache/inference-core``. It counts
tokens with a tokenizer it would otherwise fetch from a hub: it gets a byte-level one written
here at start, and the completion tokens come from the server's usage.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson
from processes import CACHE, MODEL, cpu_seconds, free_port, installed, machine_busy_seconds, percentile, spawn, stop

AIPERF = "aiperf==0.13.0"
AIPERF_VENV = Path(os.environ.get("BENCH_AIPERF_VENV", CACHE / "aiperf-venv"))
#: A measurement starts once the machine has been this idle (busy cores besides ours) for a second.
QUIET_CORES = 0.10
T = TypeVar("T")

#: A tokenizer whose tokens are bytes: aiperf builds prompts and counts with it, and it needs no hub.
TOKENIZER = """
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
tokenizer.save(sys.argv[1] + "/tokenizer.json")
config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000}
open(sys.argv[1] + "/tokenizer_config.json", "w").write(json.dumps(config))
"""


@dataclass(frozen=True)
class Workload:
    name: str
    endpoint_type: str  # aiperf's --endpoint-type
    path: str
    concurrency: int
    extra: tuple[str, ...] = ()


def workloads(args: argparse.Namespace) -> list[Workload]:
    chat = Workload("chat", "chat", "/v1/chat/completions", args.chat_concurrency,
                    ("--extra-inputs", "ignore_eos:true", "--osl", str(args.tokens)))  # fmt: skip
    messages = Workload("messages", "messages", "/v1/messages", args.messages_concurrency, ("--osl", str(args.tokens)))
    chosen = args.workloads.split(",")
    return [workload for workload in (chat, messages) if workload.name in chosen]


def aiperf_binary() -> Path:
    return installed(AIPERF_VENV, AIPERF, "aiperf")


def write_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([AIPERF_VENV / "bin/python", "-c", TOKENIZER, str(directory)], check=True)
    return directory


# Measuring.


def reaped_cpu() -> float:
    """CPU seconds of this script and of the children it has reaped (aiperf and its processes)."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip


def background(ours: list[int], work: Callable[[], T]) -> tuple[T, float]:
    """Run ``work``; return its result and the cores busy meanwhile with anything but ``ours`` and this script."""
    began, busy = time.monotonic(), machine_busy_seconds()
    mine = reaped_cpu() + sum(cpu_seconds(pid) for pid in ours)
    result = work()
    elapsed = time.monotonic() - began
    used = reaped_cpu() + sum(cpu_seconds(pid) for pid in ours) - mine
    return result, max(0.0, (machine_busy_seconds() - busy - used) / elapsed)


def wait_quiet(ours: list[int], within: float) -> float:
    """Wait (up to ``within`` seconds) for a second in which others used under ``QUIET_CORES``."""
    deadline = time.monotonic() + within
    while True:
        noise = background(ours, lambda: time.sleep(1))[1]
        if noise < QUIET_CORES or time.monotonic() > deadline:
            return noise


def schedstat(pid: int) -> tuple[float, float, int]:
    """Seconds ``pid`` (all its threads) has run and has waited runnable for a core, and how often it got one."""
    ran = waited = 0.0
    turns = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        ran += int(fields[0]) / 1e9
        waited += int(fields[1]) / 1e9
        turns += int(fields[2])
    return ran, waited, turns


def aiperf_run(
    url: str, workload: Workload, tokenizer: Path, scratch: Path, args: argparse.Namespace, requests: int
) -> Path:
    """One aiperf profile of ``workload`` against ``url``; the path of its per-request records.

    aiperf's own warm-up (twice the concurrency) takes the first burst of each fresh aiperf: its
    connections being opened and its code run for the first time.
    """
    artifacts = Path(tempfile.mkdtemp(prefix=f"{workload.name}-", dir=scratch))
    pin = ["taskset", "-c", "1"] if args.pin else []
    command = [
        *pin, str(aiperf_binary()), "profile", "--model", MODEL, "--url", url,
        "--endpoint-type", workload.endpoint_type, "--streaming", "--concurrency", str(workload.concurrency),
        "--request-count", str(requests), "--warmup-request-count", str(2 * workload.concurrency),
        "--isl", "64", *workload.extra, "--tokenizer", str(tokenizer), "--use-server-token-count",
        "--random-seed", "1", "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
        "--artifact-dir", str(artifacts),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True)
    records = artifacts / "profile_export.jsonl"
    if finished.returncode != 0 or not records.exists():
        raise RuntimeError(f"aiperf failed ({finished.returncode}):\n{(finished.stdout + finished.stderr)[-3000:]}")
    return records


def figures(records: Path, expected: int) -> dict[str, float]:
    """TTFT percentiles over requests and inter-token percentiles over every chunk gap, in ms."""
    ttft: list[float] = []
    gaps: list[float] = []
    errors = 0
    for line in records.read_bytes().splitlines():
        record = orjson.loads(line)
        if record["metadata"].get("benchmark_phase") != "profiling":
            continue
        metrics = record["metrics"]
        if "time_to_first_token" not in metrics:
            errors += 1
            continue
        ttft.append(metrics["time_to_first_token"]["value"])
        gaps += metrics.get("inter_chunk_latency", {}).get("value", [])
    assert len(ttft) == expected and not errors, f"{len(ttft)} of {expected} requests answered, {errors} failed"
    return {
        "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9), "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": percentile(gaps, 0.5), "itl_p99": percentile(gaps, 0.99),
    }  # fmt: skip


# Running.


def start_simulator(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command: list[str | Path] = [Path(sys.executable).parent / "inference-core", "simulate", "--port", str(port),
                                 "--ttft", str(args.ttft), "--itl", str(args.itl)]  # fmt: skip
    with open(log, "ab") as out:
        process = spawn(command, f"http://127.0.0.1:{port}/health", core=1 if args.pin else None, log=out)
    return process, port


def start_gateway(
    args: argparse.Namespace, backend: int, log: Path, settings: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    """``inference-core`` as users start it: the four variables the quick start names, and ``settings``."""
    port = free_port()
    env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend}/v1", "INFERENCE_MODEL": MODEL,
           "INFERENCE_PORT": str(port), "INFERENCE_HOST": "127.0.0.1"}  # fmt: skip
    env |= dict(setting.split("=", 1) for setting in settings)
    with open(log, "ab") as out:
        process = spawn([Path(sys.executable).parent / "inference-core"], f"http://127.0.0.1:{port}/health/ready",
                        env=env, core=0 if args.pin else None, log=out)  # fmt: skip
    return process, port


@dataclass
class Target:
    """What aiperf drives: the simulator itself (``process`` None) or a gateway in front of it."""

    name: str
    url: str
    process: subprocess.Popen[bytes] | None = None


def measure(
    target: Target, workload: Workload, ours: list[int], context: tuple[Path, Path], args: argparse.Namespace
) -> dict[str, float]:
    tokenizer, scratch = context
    quiet = wait_quiet(ours, args.quiet_wait)
    pid = target.process.pid if target.process is not None else None
    before = schedstat(pid) if pid is not None else (0.0, 0.0, 0)
    client, began = reaped_cpu(), time.monotonic()
    records, noise = background(ours, lambda: aiperf_run(target.url, workload, tokenizer, scratch, args, args.requests))
    after = schedstat(pid) if pid is not None else (0.0, 0.0, 0)
    result = figures(records, args.requests)
    result["noise"] = noise
    result["quiet"] = quiet
    result["client_cores"] = (reaped_cpu() - client) / (time.monotonic() - began)
    result["cpu"] = after[0] - before[0]
    # Runnable but not running: how long, on average, the gateway waited for a core each time it got one.
    result["wait_us"] = (after[1] - before[1]) / max(1, after[2] - before[2]) * 1e6
    return result


def progress(m: dict[str, float], *, gateway: bool) -> str:
    line = (f"TTFT p50 {m['ttft_p50']:.1f} p90 {m['ttft_p90']:.1f} p99 {m['ttft_p99']:.1f} ms, ITL p50 "
            f"{m['itl_p50']:.2f} p99 {m['itl_p99']:.2f} ms; noise {m['noise']:.2f} (before {m['quiet']:.2f}), "
            f"aiperf {m['client_cores']:.2f} cores")  # fmt: skip
    if gateway:
        line += f"; gateway CPU {m['cpu']:.2f} s, {m['wait_us']:.0f} µs wait for a core a turn"
    return line


COLUMNS = ("ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p99")


def report(results: dict[tuple[str, str], list[dict[str, float]]], chosen: list[Workload], names: list[str]) -> None:
    """One Markdown table: each target's medians over runs, then what each gateway added to the direct figures."""
    print("\n| endpoint | c | target | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
          "noise | gateway's wait for a core, µs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in chosen:
        medians = {}
        for name in names:
            runs = results[workload.name, name]
            medians[name] = m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            cells = " | ".join(f"{m[key]:.2f}" for key in COLUMNS)
            wait = "" if name == "direct" else f"{m['wait_us']:.0f}"
            print(f"| {workload.path} | {workload.concurrency} | {name} | {cells} | {m['noise']:.2f} | {wait} |")
        for name in names[1:]:
            added = " | ".join(f"{medians[name][key] - medians['direct'][key]:+.2f}" for key in COLUMNS)
            print(f"| {workload.path} | {workload.concurrency} | added by {name} | {added} |  |  |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="alternated runs of each workload and target")
    parser.add_argument("--requests", type=int, default=1000, help="measured requests a run (after a warm-up)")
    parser.add_argument("--warmup-requests", type=int, default=300,
                        help="requests of each workload sent to each target, unrecorded, before the runs")  # fmt: skip
    parser.add_argument("--ttft", type=float, default=0.02, help="the simulator's seconds before the first token")
    parser.add_argument("--itl", type=float, default=0.01, help="the simulator's seconds between tokens")
    parser.add_argument("--tokens", type=int, default=20, help="tokens a chat stream asks for (max for messages)")
    parser.add_argument("--chat-concurrency", type=int, default=16)
    parser.add_argument("--messages-concurrency", type=int, default=4)
    parser.add_argument("--workloads", default="chat,messages", help="comma-separated, from: chat, messages")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the gateway (repeatable), e.g. INFERENCE_ACCESS_LOG=false")  # fmt: skip
    parser.add_argument("--variant-env", action="append", default=[], metavar="NAME=VALUE",
                        help="also run a second gateway with these settings (repeatable), alternated with the "
                             "others: one thing toggled at a time")  # fmt: skip
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the kernel place every process")
    parser.add_argument("--quiet-wait", type=float, default=30, help="most seconds to wait for a quiet machine")
    args = parser.parse_args()
    chosen = workloads(args)
    aiperf_binary()
    placement = "gateways on core 0, simulator and aiperf on core 1" if args.pin else "unpinned"
    print(f"{time.strftime('%Y-%m-%d %H:%M')}: {AIPERF}, Python {platform.python_version()}, {os.cpu_count()} cores, "
          f"{placement}; simulator ttft {args.ttft * 1000:g} ms, itl {args.itl * 1000:g} ms, {args.tokens} tokens; "
          f"{args.runs} runs of {args.requests} requests, medians", flush=True)  # fmt: skip
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        tokenizer = write_tokenizer(scratch / "tokenizer")
        simulator, backend = start_simulator(args, scratch / "simulator.log")
        targets = [Target("direct", f"http://127.0.0.1:{backend}")]
        try:
            variants = [("gateway", args.gateway_env)]
            if args.variant_env:
                variants.append(("gateway " + " ".join(args.variant_env), args.gateway_env + args.variant_env))
            for name, settings in variants:
                process, port = start_gateway(args, backend, scratch / f"gateway-{len(targets)}.log", settings)
                targets.append(Target(name, f"http://127.0.0.1:{port}", process))
            ours = [simulator.pid] + [target.process.pid for target in targets if target.process is not None]
            # Unrecorded: whichever target went first after start-up would take the servers' one-off costs (the
            # first connections, code run for the first time, the simulator's first full garbage collection).
            for workload in chosen:
                for target in targets:
                    aiperf_run(target.url, workload, tokenizer, scratch, args, args.warmup_requests)
            for run in range(args.runs):
                for workload in chosen:
                    for target in targets if run % 2 == 0 else targets[::-1]:
                        m = measure(target, workload, ours, (tokenizer, scratch), args)
                        results.setdefault((workload.name, target.name), []).append(m)
                        print(f"  run {run + 1} {workload.name} c={workload.concurrency} {target.name}: "
                              + progress(m, gateway=target.process is not None), flush=True)  # fmt: skip
        finally:
            for target in targets:
                if target.process is not None:
                    stop(target.process)
            stop(simulator)
    report(results, chosen, [target.name for target in targets])


if __name__ == "__main__":
    main()
