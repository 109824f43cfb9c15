"""Cache-aware routing on real vLLM: two CPU replicas publishing KV events, round_robin against cache_aware.

    python bench/cache_routing_vllm.py [--groups 7] [--questions 4]

Starts two vLLM replicas (the CPU build, ``scripts/vllm-venv``, with the tiny test model that
``tests/vllm/build_model.py`` writes under ``~/.cache/inference-core/tiny-llama-v1``), each with
``--kv-events-config``, and for each policy a gateway in front of both: ``round_robin``, then
``cache_aware`` (with the model's tokenizer directory), then ``round_robin`` again, so neither is
favoured by going first. Between policies each replica's prefix cache is emptied
(``POST /reset_prefix_cache``, a vLLM dev-mode route). The workload is ``--groups`` documents of
about 400 tokens (3 of vLLM CPU's 128-token blocks) shared by ``--questions`` questions each,
sent one at a time, groups interleaved (an odd number of them, so round robin visits each
replica with every group).

Reported per policy, from vLLM's own counters summed over the replicas:
``vllm:prefix_cache_hits_total`` and ``vllm:prefix_cache_queries_total`` (tokens), and the hit
rate. With everything fitting in both caches, round robin pays each document's prefill once per
replica and cache_aware once: with 4 questions per document the best case is 3 hits of 4
requests against 2 of 4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import CACHE, free_port, spawn, start, stop

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
TINY = CACHE / "tiny-llama-v1"
VLLM_START_SECONDS = 600


def counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


class Replica(NamedTuple):
    """A vLLM publishing its KV events."""

    process: subprocess.Popen[bytes]
    url: str
    events: str
    replay: str


def replica(python: Path, scratch: Path, log: Path) -> Replica:
    port, events, replay = free_port(), free_port(), free_port()
    config = {
        "enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
        "endpoint": f"tcp://*:{events}", "replay_endpoint": f"tcp://127.0.0.1:{replay}",
    }  # fmt: skip
    env = {
        "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
        "VLLM_SERVER_DEV_MODE": "1", "TMPDIR": str(scratch), "VLLM_CACHE_ROOT": str(scratch),
    }  # fmt: skip
    command: list[str | Path] = [
        python.parent / "vllm", "serve", TINY / "model", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--kv-events-config", json.dumps(config),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = spawn(command, f"http://127.0.0.1:{port}/health", env=env, log=out, within=VLLM_START_SECONDS)
    return Replica(process, f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}")


def workload(groups: int, questions: int) -> list[dict[str, object]]:
    """Each group's document, then a question: groups interleaved, so consecutive requests differ."""
    documents = [
        f"Document {g}: " + " ".join(f"clause {g}.{n} binds party {n % 7}" for n in range(40)) for g in range(groups)
    ]
    return [
        {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "system", "content": documents[g]}, {"role": "user", "content": f"Question {q} on {g}?"}]}
        for q in range(questions) for g in range(groups)
    ]  # fmt: skip


def run(policy: str, replicas: list[Replica], bodies: list[dict[str, object]]) -> dict[str, float]:
    urls = [r.url for r in replicas]
    for url in urls:
        httpx.post(url + "/reset_prefix_cache", timeout=30).raise_for_status()
    port = free_port()
    env = {
        "INFERENCE_BASE_URL": ",".join(url + "/v1" for url in urls), "INFERENCE_MODEL": MODEL,
        "INFERENCE_PORT": str(port), "INFERENCE_HOST": "127.0.0.1", "INFERENCE_LOG_LEVEL": "warning",
        "INFERENCE_ACCESS_LOG": "false", "INFERENCE_LB_POLICY": policy,
        "INFERENCE_KV_EVENTS": ",".join(r.events for r in replicas),
        "INFERENCE_KV_REPLAY": ",".join(r.replay for r in replicas),
        "INFERENCE_TOKENIZER": str(TINY / "model"),
    }  # fmt: skip
    gateway = start([], env, f"http://127.0.0.1:{port}/health/ready")
    hits = [counter(url, "vllm:prefix_cache_hits_total") for url in urls]
    queries = [counter(url, "vllm:prefix_cache_queries_total") for url in urls]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for body in bodies:
                answer = client.post("/v1/chat/completions", json=body)
                if answer.status_code != 200:
                    raise RuntimeError(f"{policy}: {answer.status_code} {answer.text}")
    finally:
        stop(gateway)
    hit = sum(counter(url, "vllm:prefix_cache_hits_total") for url in urls) - sum(hits)
    queried = sum(counter(url, "vllm:prefix_cache_queries_total") for url in urls) - sum(queries)
    return {"hits": hit, "queries": queried, "rate": hit / queried if queried else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=7, help="an odd number, or round robin pins each to one replica")
    parser.add_argument("--questions", type=int, default=4)
    args = parser.parse_args()
    venv = subprocess.run([ROOT / "scripts/vllm-venv"], check=True, capture_output=True, text=True).stdout.strip()
    python = Path(venv) / "bin/python"
    if not (TINY / "model/tokenizer.json").exists():
        subprocess.run([python, ROOT / "tests/vllm/build_model.py", TINY], check=True)
    bodies = workload(args.groups, args.questions)
    with tempfile.TemporaryDirectory() as scratch:
        replicas: list[Replica] = []
        try:
            for number in range(2):
                folder = Path(scratch) / str(number)
                folder.mkdir()
                replicas.append(replica(python, folder, folder / "vllm.log"))
            results = [
                (policy, run(policy, replicas, bodies)) for policy in ("round_robin", "cache_aware", "round_robin")
            ]
        finally:
            for served in replicas:
                stop(served.process)
    print(f"two vLLM CPU replicas, {args.groups} documents x {args.questions} questions, one at a time")
    print("| policy | prefix-cache hits (tokens) | queries (tokens) | hit rate |\n|---|---|---|---|")
    for policy, result in results:
        print(f"| {policy} | {result['hits']:.0f} | {result['queries']:.0f} | {result['rate']:.1%} |")


if __name__ == "__main__":
    main()
