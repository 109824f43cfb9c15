"""inference-core side by side with nginx, vLLM's Rust router and LiteLLM, in front of one fixed backend.

An nginx backend answers a fixed chat.completion (JSON) or a fixed 20-chunk SSE stream (and its usage). wrk
drives it directly, and through each target: nginx ``proxy_pass`` (the floor for one hop),
vllm-router (Rust, PyPI ``vllm-router``), the LiteLLM proxy (PyPI ``litellm[proxy]``, one
worker, no database), inference-core with its defaults (queue, metrics, JSON access log to a
file), the same started with the documented ``uvicorn inference_core.api:app`` command
(``inference-core-uvicorn``), inference-core from a three-backend configuration file
(``inference-core-fleet``: the benchmark's model is routed past two other backends' globs to the
third), with a named key whose
rpm and tpm count every request (``inference-core-keys``), and the same with the key's windows
in Redis (``inference-core-redis``, a redis-server beside the backend). The target under test
is pinned to core 0; the backend and wrk share core 1. For JSON and SSE, at concurrency 1 and 64,
it prints req/s, p50, p99, the p50 the hop adds over the backend alone, the target's CPU time
per request (from /proc, so robust to noise), its peak RSS and the background CPU seen during
the runs (noise: busy cores that were none of ours). Each figure is the median of ``--runs``
runs of ``--seconds``; each run waits for a quiet machine first.

    python bench/compare.py [--seconds 10] [--runs 3] [--targets direct,nginx,...]
    python bench/compare.py --targets direct,inference-core --flamegraph bench/flamegraph-c64.svg

Installs what it needs on first use: nginx and wrk from Debian's packages, vllm-router and
LiteLLM each in a venv under ``~/.cache/inference-core``; ``--flamegraph`` needs py-spy.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import orjson
from processes import (
    CACHE,
    MODEL,
    cpu_seconds,
    free_port,
    installed,
    machine_busy_seconds,
    peak_rss_mb,
    router_binary,
    spawn,
    stop,
)

LITELLM = "litellm[proxy]==1.108.7"
LITELLM_VENV = Path(os.environ.get("BENCH_LITELLM_VENV", CACHE / "litellm-venv"))
MASTER_KEY = "sk-bench-master-key"
T = TypeVar("T")
TARGETS = (
    "direct", "nginx", "vllm-router", "litellm",
    "inference-core", "inference-core-uvicorn", "inference-core-fleet", "inference-core-keys", "inference-core-redis",
)  # fmt: skip
KINDS = ("json", "sse")
CONCURRENCY = (1, 64)
#: A run starts once the machine has been this idle (busy cores besides ours) for a second.
QUIET_CORES = 0.10
QUIET_WAIT_SECONDS = 30

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.body = '%(body)s'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status + e.connect + e.read + e.write + e.timeout))
end
"""


# The backend's fixed answers.


def chat_completion() -> bytes:
    text = " ".join(["token"] * 20)
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
    })  # fmt: skip


def event_stream(chunks: int = 20) -> bytes:
    frames = []
    for index in range(chunks):
        delta = {"role": "assistant", "content": ""} if index == 0 else {"content": " token"}
        finish = "length" if index == chunks - 1 else None
        chunk = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }  # fmt: skip
        frames.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    # What vLLM adds for the gateway, which asks every stream's usage (and takes this event out again).
    usage = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
        "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks},
    }  # fmt: skip
    frames.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    return b"".join(frames) + b"data: [DONE]\n\n"


def nginx_literal(body: bytes) -> str:
    """A short ``body`` as an nginx quoted string (which would read ``$`` as a variable)."""
    text = body.decode()
    assert "$" not in text and "'" not in text and len(text) < 1000
    return "'" + text + "'"


NGINX_MAIN = """
user root;
worker_processes 1;
pid %(dir)s/%(name)s.pid;
error_log %(dir)s/%(name)s-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path %(dir)s/body; proxy_temp_path %(dir)s/proxy; fastcgi_temp_path %(dir)s/fastcgi;
  uwsgi_temp_path %(dir)s/uwsgi; scgi_temp_path %(dir)s/scgi;
%(servers)s
}
"""

BACKEND_SERVER = """
  server {
    listen 127.0.0.1:%(port)d;
    location = /health { return 200 ''; }
    location = /version { default_type application/json; return 200 '{"version":"0.12.0"}'; }
    location = /v1/models { default_type application/json; return 200 %(models)s; }
    # A POST to a file is refused with 405; the refusal is turned into the file's content.
    location / { return 405; error_page 405 =200 /%(kind)s; }
    location = /%(kind)s { internal; default_type %(type)s; root %(dir)s; }
  }
"""

PROXY_SERVER = """
  upstream backend { server 127.0.0.1:%(backend)d; keepalive 128; }
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
"""


def run_nginx(scratch: Path, name: str, servers: str, ready: str, core: int) -> subprocess.Popen[bytes]:
    conf = scratch / f"{name}.conf"
    conf.write_text(NGINX_MAIN % {"dir": scratch, "name": name, "servers": servers})
    with open(scratch / f"{name}.log", "w+b") as log:
        try:
            return spawn([shutil.which("nginx") or "nginx", "-c", conf, "-g", "daemon off;"], ready, core=core, log=log)
        except RuntimeError:
            log.seek(0)
            raise RuntimeError(f"nginx did not start: {log.read().decode()}") from None


# What is measured.


@dataclass
class Running:
    """A target, started in front of one backend: its process (None for the backend itself) and URL."""

    process: subprocess.Popen[bytes] | None
    url: str
    #: What it needs beside it (a Redis server), stopped with it.
    companions: tuple[subprocess.Popen[bytes], ...] = ()


Starter = Callable[[Path, int, str], Running]


def start_direct(scratch: Path, backend: int, kind: str) -> Running:
    return Running(None, f"http://127.0.0.1:{backend}")


def start_nginx(scratch: Path, backend: int, kind: str) -> Running:
    port = free_port()
    servers = PROXY_SERVER % {"backend": backend, "port": port}
    return Running(run_nginx(scratch, f"proxy-{kind}", servers, f"http://127.0.0.1:{port}/health", 0),
                   f"http://127.0.0.1:{port}")  # fmt: skip


def start_router(scratch: Path, backend: int, kind: str) -> Running:
    port = free_port()
    command = [router_binary(), "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
               "--worker-urls", f"http://127.0.0.1:{backend}", "--log-level", "error"]  # fmt: skip
    return Running(spawn(command, f"http://127.0.0.1:{port}/health", core=0), f"http://127.0.0.1:{port}")


def litellm_binary() -> Path:
    return installed(LITELLM_VENV, LITELLM, "litellm")


def start_litellm(scratch: Path, backend: int, kind: str) -> Running:
    port = free_port()
    config = scratch / f"litellm-{kind}.yaml"
    config.write_text(
        f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{backend}/v1\n      api_key: none\n"
        f"litellm_settings:\n  telemetry: false\n  set_verbose: false\n"
        f"general_settings:\n  master_key: {MASTER_KEY}\n"
    )
    command = [litellm_binary(), "--config", config, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    # Offline: LiteLLM counts streamed tokens with a tokenizer it would otherwise try to download.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    with open(scratch / f"litellm-{kind}.log", "ab") as log:
        process = spawn(command, f"http://127.0.0.1:{port}/health/liveliness", env=env, core=0, log=log, within=180)
    return Running(process, f"http://127.0.0.1:{port}")


def start_gateway(scratch: Path, backend: int, kind: str) -> Running:
    """inference-core as the brief configures it: queue, metrics and the JSON access log on."""
    port = free_port()
    env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend}/v1", "INFERENCE_MODEL": MODEL}
    command = [sys.executable, "-m", "inference_core", "--host", "127.0.0.1", "--port", str(port)]
    with open(scratch / f"inference-core-{kind}.log", "ab") as log:
        process = spawn(command, f"http://127.0.0.1:{port}/health/ready", env=env, core=0, log=log)
    return Running(process, f"http://127.0.0.1:{port}")


def start_uvicorn(scratch: Path, backend: int, kind: str) -> Running:
    """inference-core started the way the brief documents it: ``uvicorn inference_core.api:app``."""
    port = free_port()
    env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend}/v1", "INFERENCE_MODEL": MODEL}
    command = [sys.executable, "-m", "uvicorn", "inference_core.api:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(scratch / f"uvicorn-{kind}.log", "ab") as log:
        process = spawn(command, f"http://127.0.0.1:{port}/health/ready", env=env, core=0, log=log)
    return Running(process, f"http://127.0.0.1:{port}")


def start_fleet(scratch: Path, backend: int, kind: str) -> Running:
    """inference-core with a three-backend file: the benchmark's model is the third backend's, by glob."""
    port = free_port()
    root = f"http://127.0.0.1:{backend}/v1"
    config = scratch / f"fleet-{kind}.yaml"
    config.write_text(
        f"backends:\n  chat:\n    base_url: {root}\n    models: [llama-*]\n"
        f"  coder:\n    base_url: {root}\n    models: [qwen-coder-*]\n"
        f"  main:\n    base_url: {root}\n    models: ['{MODEL}']\n"
        f"models:\n  fast:\n    target: chat/llama-3-8b\n    fallbacks: ['main/{MODEL}']\n"
    )
    command = [sys.executable, "-m", "inference_core", "--host", "127.0.0.1", "--port", str(port), "--config", config]
    with open(scratch / f"fleet-{kind}.log", "ab") as log:
        process = spawn(command, f"http://127.0.0.1:{port}/health/ready", env={}, core=0, log=log)
    return Running(process, f"http://127.0.0.1:{port}")


KEYS_FILE = f"""
model: {MODEL}
keys:
  bench:
    key: {MASTER_KEY}
    rpm: 100000000
    tpm: 100000000000
"""


def start_keyed(scratch: Path, backend: int, kind: str, redis: str | None = None) -> Running:
    """inference-core with a named key limited by rpm and tpm (so every request is counted)."""
    port = free_port()
    config = scratch / f"keys-{kind}.yaml"
    config.write_text(KEYS_FILE)
    env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend}/v1"} | ({"INFERENCE_REDIS_URL": redis} if redis else {})
    command = [sys.executable, "-m", "inference_core", "--host", "127.0.0.1", "--port", str(port), "--config", config]
    with open(scratch / f"keys-{kind}.log", "ab") as log:
        process = spawn(command, f"http://127.0.0.1:{port}/health/ready", env=env, core=0, log=log)
    return Running(process, f"http://127.0.0.1:{port}")


def start_redis_keyed(scratch: Path, backend: int, kind: str) -> Running:
    """The same, with the key's windows in a Redis server (on core 1, beside the backend)."""
    port = free_port()
    redis = subprocess.Popen(
        ["taskset", "-c", "1", "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", scratch],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    running = start_keyed(scratch, backend, kind, f"redis://127.0.0.1:{port}/0")
    return Running(running.process, running.url, (redis,))


STARTERS: dict[str, Starter] = {
    "direct": start_direct,
    "nginx": start_nginx,
    "vllm-router": start_router,
    "litellm": start_litellm,
    "inference-core": start_gateway,
    "inference-core-uvicorn": start_uvicorn,
    "inference-core-fleet": start_fleet,
    "inference-core-keys": start_keyed,
    "inference-core-redis": start_redis_keyed,
}


def request_body(kind: str) -> bytes:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 20}
    if kind == "sse":
        body["stream"] = True
    return orjson.dumps(body)


def check(url: str, kind: str) -> None:
    """One answer of the right shape before any figure is taken."""
    response = httpx.post(
        url + "/v1/chat/completions",
        content=request_body(kind),
        headers={"content-type": "application/json", "authorization": f"Bearer {MASTER_KEY}"},
        timeout=30,
    )
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:300]}"
    if kind == "json":
        assert response.json()["object"] == "chat.completion", response.text[:300]
    else:
        events = [line for line in response.text.splitlines() if line.startswith("data:")]
        assert len(events) >= 20 and events[-1].strip() == "data: [DONE]", response.text[:300]


def our_cpu(pids: list[int]) -> float:
    """CPU seconds used by ``pids``, this script and the children it has reaped (wrk)."""
    own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip
    return own + sum(cpu_seconds(pid) for pid in pids)


def background(ours: list[int], work: Callable[[], T]) -> tuple[T, float]:
    """Run ``work``; return its result and the cores busy meanwhile with anything but ``ours``."""
    began, busy, mine = time.monotonic(), machine_busy_seconds(), our_cpu(ours)
    result = work()
    elapsed = time.monotonic() - began
    others = machine_busy_seconds() - busy - (our_cpu(ours) - mine)
    return result, max(0.0, others / elapsed)


def wait_quiet(ours: list[int]) -> float:
    """Wait (up to ``QUIET_WAIT_SECONDS``) for a second in which others used under ``QUIET_CORES``."""
    deadline = time.monotonic() + QUIET_WAIT_SECONDS
    while True:
        noise = background(ours, lambda: time.sleep(1))[1]
        if noise < QUIET_CORES or time.monotonic() > deadline:
            return noise


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    """One wrk run on core 1 (reaped by this process, so its CPU counts as ours, not as noise)."""
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
               "-s", str(script), url + "/v1/chat/completions"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True)
    out, err = finished.stdout, finished.stderr
    match = re.search(rb"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    assert match, (out + err).decode()
    requests, duration_us, p50_us, p99_us, errors = map(int, match.groups())
    assert errors == 0, f"{errors} errors from {url}:\n{out.decode()}"
    return {"requests": requests, "rps": requests / (duration_us / 1e6), "p50": p50_us / 1000, "p99": p99_us / 1000}


def measure(
    running: Running, backend_pid: int, script: Path, connections: int, args: argparse.Namespace
) -> dict[str, float]:
    target = running.process.pid if running.process is not None else None
    ours = [backend_pid] + ([target] if target is not None else [])
    wrk(running.url, script, connections, 1)  # warm-up
    runs = []
    for _ in range(args.runs):
        noise = wait_quiet(ours)
        cpu = cpu_seconds(target) if target is not None else 0.0
        result, during = background(ours, lambda: wrk(running.url, script, connections, args.seconds))
        result["noise"] = max(noise, during)
        result["cpu_us"] = (cpu_seconds(target) - cpu) / result["requests"] * 1e6 if target is not None else 0.0
        runs.append(result)
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def profile(running: Running, script: Path, seconds: int, output: Path) -> None:
    """A py-spy flame graph of the gateway under wrk at concurrency 64."""
    assert running.process is not None
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(running.process.pid), "--duration", str(seconds),
                            "--rate", "250", "--nonblocking", "--output", str(output)])  # fmt: skip
    time.sleep(1)
    wrk(running.url, script, 64, seconds - 2)
    spy.wait()
    print(f"flame graph of inference-core at c=64 (JSON): {output}")


def ensure_tools() -> None:
    needed = (("nginx", "nginx-light"), ("wrk", "wrk"), ("redis-server", "redis-server"))
    missing = [package for command, package in needed if not shutil.which(command)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, stdout=subprocess.DEVNULL)


def versions() -> str:
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    router = subprocess.run([router_binary().parent / "pip", "show", "vllm-router"], capture_output=True, text=True)
    router_version = re.search(r"Version: (\S+)", router.stdout)
    return (f"nginx {nginx}, vllm-router {router_version.group(1) if router_version else '?'}, {LITELLM}, "
            f"Python {sys.version.split()[0]}, {os.cpu_count()} cores")  # fmt: skip


def report(results: dict[tuple[str, int, str], dict[str, float]], targets: list[str]) -> None:
    """Two Markdown tables: every target's figures, then inference-core's ratios to each peer."""
    print("\n| body | c | target | req/s | p50 ms | p99 ms | added p50 ms | CPU µs/req | peak RSS MB | noise |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        for connections in CONCURRENCY:
            direct = results.get((kind, connections, "direct"))
            for target in targets:
                m = results.get((kind, connections, target))
                if m is None:
                    continue
                hop = target != "direct"
                added = f"{m['p50'] - direct['p50']:+.2f}" if direct and hop else ""
                cpu, rss = (f"{m['cpu_us']:.0f}", f"{m['rss']:.0f}") if hop else ("", "")
                print(f"| {kind} | {connections} | {target} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | "
                      f"{added} | {cpu} | {rss} | {m['noise']:.2f} |")  # fmt: skip
    ours = "inference-core"
    if ours not in targets:
        return
    print(f"\n| body | c | {ours} against | req/s | added p50 | CPU per request |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        for connections in CONCURRENCY:
            mine = results.get((kind, connections, ours))
            direct = results.get((kind, connections, "direct"))
            for peer in ("litellm", "nginx", "vllm-router"):
                theirs = results.get((kind, connections, peer))
                if mine is None or theirs is None:
                    continue
                added = "" if direct is None else (
                    f"{(mine['p50'] - direct['p50']) / max(theirs['p50'] - direct['p50'], 0.001):.2f}x")  # fmt: skip
                print(f"| {kind} | {connections} | {peer} | {mine['rps'] / theirs['rps']:.2f}x | {added} | "
                      f"{mine['cpu_us'] / theirs['cpu_us']:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    parser.add_argument("--flamegraph", type=Path, help="also record inference-core at c=64 (JSON) with py-spy")
    args = parser.parse_args()
    targets = [target for target in TARGETS if target in args.targets.split(",")]
    ensure_tools()
    print(f"{time.strftime('%Y-%m-%d')}: {versions()}; {args.runs} runs of {args.seconds:g} s, medians")
    results: dict[tuple[str, int, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        ports = {kind: free_port() for kind in KINDS}
        models = nginx_literal(orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}))
        servers = ""
        for kind, media_type, body in (("json", "application/json", chat_completion()),
                                       ("sse", "text/event-stream", event_stream())):  # fmt: skip
            (scratch / kind).write_bytes(body)
            fields = {"port": ports[kind], "models": models, "type": media_type, "kind": kind, "dir": scratch}
            servers += BACKEND_SERVER % fields
        backend = run_nginx(scratch, "backend", servers, f"http://127.0.0.1:{ports['json']}/health", 1)
        try:
            for kind in KINDS:
                script = scratch / f"{kind}.lua"
                script.write_text(WRK_SCRIPT % {"key": MASTER_KEY, "body": request_body(kind).decode()})
                for target in targets:
                    running = STARTERS[target](scratch, ports[kind], kind)
                    try:
                        check(running.url, kind)
                        for connections in CONCURRENCY:
                            m = measure(running, backend.pid, script, connections, args)
                            m["rss"] = peak_rss_mb(running.process.pid) if running.process is not None else 0.0
                            results[kind, connections, target] = m
                            print(f"  {kind} c={connections} {target}: {m['rps']:.0f} req/s, p50 {m['p50']:.2f} ms",
                                  flush=True)  # fmt: skip
                        if args.flamegraph and target == "inference-core" and kind == "json":
                            profile(running, script, 12, args.flamegraph)
                    except AssertionError as failure:  # one misbehaving peer must not lose the others' figures
                        print(f"  {kind} {target}: not measured: {str(failure).splitlines()[0]}", flush=True)
                    finally:
                        if running.process is not None:
                            stop(running.process)
                        for companion in running.companions:
                            stop(companion)
        finally:
            stop(backend)
    report(results, targets)


if __name__ == "__main__":
    main()
