"""Benchmarks in their short forms: what they measure must hold, even if the figures are not quoted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, BENCH / script, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_short_soak() -> None:
    """Mixed traffic: no wrong answers, and RSS and descriptors level off."""
    output = run_bench("soak.py", "--seconds", "15", "--every", "3", "--concurrency", "16")
    assert "levelled off / 0 unexpected answers" in output


def test_paced_streams_arrive_whole_and_on_time() -> None:
    """Every stream arrives whole through the gateway, its events still paced."""
    output = run_bench("long_streams.py", "--streams", "50", "--tokens", "20", "--itl", "0.01")
    row = output.splitlines()[-1].split()
    assert row[0] == "50", output
    gateway_p50 = float(row[3])
    assert 5 < gateway_p50 < 30, f"events 10 ms apart arrived {gateway_p50} ms apart at the median"


def test_a_batch_runs_beside_interactive_requests() -> None:
    """Its short form: the batch completes, and interactive requests are answered while it runs."""
    output = run_bench("batch_latency.py", "--lines", "200", "--seconds", "3", "--concurrency", "4")
    assert "batch alone: 200 lines" in output and "'completed': 200, 'failed': 0" in output, output
    rows = [line for line in output.splitlines() if line.startswith(("| alone", "| with a batch running"))]
    assert len(rows) == 2 and all(int(row.split("|")[2]) > 0 for row in rows), output


def test_cache_aware_routing_finds_the_cached_prompts() -> None:
    """Its short form: every request answered under both policies, cache_aware's replicas hit their caches more,
    and the routing decision is timed."""
    output = run_bench(
        "cache_routing.py", "--replicas", "3", "--groups", "8", "--rate", "30", "--warmup", "2", "--seconds", "3",
        "--workloads", "documents", "--policies", "round_robin,cache_aware", "--decision-trials", "20",
        "--index-blocks", "500", "--quiet-wait", "0", "--retries", "0",
    )  # fmt: skip
    rows = {row.split("|")[2].strip(): row.split("|") for row in output.splitlines() if row.startswith("| documents")}
    assert set(rows) == {"round_robin", "cache_aware"}, output
    for row in rows.values():
        assert int(row[3]) > 0 and int(row[13]) == 0, output  # requests counted, none failed
    hit_rates = {policy: float(row[9].strip(" %")) for policy, row in rows.items()}
    assert hit_rates["cache_aware"] > hit_rates["round_robin"], output
    assert "| a conversation's turn 8 |" in output, output
