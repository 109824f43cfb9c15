"""A large batch input end to end: how long each stage takes, and what it costs the gateway.

Writes ``--lines`` (2,000) lines of ``--line-kb`` (100) kB each (200 MB), uploads them, creates
a batch and follows it to the end, asking for the batch every 50 ms while it validates. Prints
the time of the upload, the validation and the run (the simulator answers at once), the slowest
answer to those questions during validation (what other file and batch calls wait), and how much
the gateway's peak RSS grew.

    python bench/batch_input.py [--lines 2000] [--line-kb 100] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import openai
import orjson
from processes import MODEL, free_port, peak_rss_mb, start, stop


def write_input(path: Path, lines: int, line_kb: int) -> None:
    content = "x" * (line_kb * 1000 - 200)
    with path.open("wb") as target:
        for i in range(lines):
            body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3}
            target.write(orjson.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": body}) + b"\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--line-kb", type=int, default=100)
    parser.add_argument("--database-url", default="", help="keep the batch in PostgreSQL (an empty database)")
    args = parser.parse_args()
    backend, port = free_port(), free_port()
    simulator = start(["simulate", "--port", str(backend)], {}, f"http://127.0.0.1:{backend}/health")
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        env = {"INFERENCE_BASE_URL": f"http://127.0.0.1:{backend}/v1", "INFERENCE_MODEL": MODEL,
               "INFERENCE_DATA_DIR": scratch, "INFERENCE_DATABASE_URL": args.database_url}  # fmt: skip
        gateway = start(["--port", str(port)], env, base + "/health/ready")
        source = Path(scratch) / "input.jsonl"
        write_input(source, args.lines, args.line_kb)
        try:
            before = peak_rss_mb(gateway.pid)
            with source.open("rb") as upload, openai.OpenAI(base_url=base + "/v1", api_key="unused") as client:
                started = time.monotonic()
                stored = client.files.create(file=("input.jsonl", upload), purpose="batch")
                uploaded = time.monotonic()
                batch = client.batches.create(
                    input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                slowest = 0.0
                while True:
                    asked = time.monotonic()
                    status = client.batches.retrieve(batch.id).status
                    slowest = max(slowest, time.monotonic() - asked)
                    if status != "validating":
                        break
                    time.sleep(0.05)
                validated = time.monotonic()
                while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
                    time.sleep(0.05)
                finished = time.monotonic()
            grown = peak_rss_mb(gateway.pid) - before
        finally:
            stop(gateway)
            stop(simulator)
    print(f"{stored.bytes / 1e6:.0f} MB, {args.lines} lines, {'PostgreSQL' if args.database_url else 'SQLite'}: "
          f"{done.status} {done.request_counts}")  # fmt: skip
    print(f"upload {uploaded - started:.1f} s, validation {validated - uploaded:.1f} s, "
          f"run and result files {finished - validated:.1f} s")  # fmt: skip
    print(f"slowest batch retrieve during validation: {slowest * 1000:.0f} ms; gateway peak RSS +{grown:.0f} MB")


if __name__ == "__main__":
    main()
