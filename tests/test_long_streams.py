"""The long-stream benchmark in a short form: every stream arrives whole, paced, through the gateway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LONG_STREAMS = Path(__file__).resolve().parents[1] / "bench/long_streams.py"


def test_paced_streams_arrive_whole_and_on_time() -> None:
    result = subprocess.run(
        [sys.executable, LONG_STREAMS, "--streams", "50", "--tokens", "20", "--itl", "0.01"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = result.stdout.splitlines()[-1].split()
    assert row[0] == "50", result.stdout
    gateway_p50 = float(row[3])
    assert 5 < gateway_p50 < 30, f"events 10 ms apart arrived {gateway_p50} ms apart at the median"
