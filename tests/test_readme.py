"""The README's Python examples, run as written against a gateway (only the address changed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.servers import Server

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _example(after: str) -> str:
    """The first Python block after the line ``after``."""
    found = re.search(re.escape(after) + r".*?```python\n(.*?)```", README, re.S)
    assert found, f"no Python example after {after!r}"
    return found.group(1)


def test_sdk_examples_print_what_they_promise(gateway: Server) -> None:
    program = _example("With the OpenAI SDK") + _example("Streaming, with token usage at the end")
    program = program.replace("http://localhost:8080", gateway.url)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\n\d+ prompt \+ \d+ completion tokens\n$", done.stdout), done.stdout
