"""The soak benchmark in its short form: mixed traffic, no wrong answers, RSS and descriptors level off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench/soak.py"


def test_short_soak() -> None:
    result = subprocess.run(
        [sys.executable, SOAK, "--seconds", "15", "--every", "3", "--concurrency", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "levelled off / 0 unexpected answers" in result.stdout
