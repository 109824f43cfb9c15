"""``inference-core batch``: submit a JSONL file to a running gateway's Batch API and follow it.

    inference-core batch submit FILE.jsonl --endpoint /v1/chat/completions [--wait] [--output-dir D]
    inference-core batch status BATCH_ID

The gateway's URL comes from ``--base-url`` or ``OPENAI_BASE_URL`` and the key from
``--api-key`` or ``OPENAI_API_KEY``, as the OpenAI SDK reads them. With ``--wait`` it shows a
progress bar (done, failed, rate, time left) and, when the batch ends, writes
``<batch id>_output.jsonl`` and ``<batch id>_errors.jsonl`` into the output folder; the exit
status is 0 when the batch completed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

DEFAULT_BASE_URL = "http://localhost:8080/v1"
FINAL = ("completed", "failed", "cancelled", "expired")
POLL_SECONDS = 1.0


def _parser() -> argparse.ArgumentParser:
    # The gateway and the key, given after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL))
    common.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    parser = argparse.ArgumentParser(prog="inference-core batch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", parents=[common], help="upload FILE and start a batch on it")
    submit.add_argument("file", type=Path)
    submit.add_argument("--endpoint", required=True, help="e.g. /v1/chat/completions")
    submit.add_argument("--completion-window", default="24h")
    submit.add_argument("--wait", action="store_true", help="follow the batch and download its results")
    submit.add_argument("--output-dir", type=Path, default=Path("."))
    status = commands.add_parser("status", parents=[common], help="print a batch")
    status.add_argument("batch_id")
    return parser


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.base_url.rstrip("/") + "/", headers=headers, timeout=60)


def _checked(response: httpx.Response) -> Any:
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise SystemExit(f"inference-core batch: HTTP {response.status_code}: {message}")
    return response.json()


def _follow(client: httpx.Client, batch: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar; then download its files."""
    with tqdm(total=0, unit="line", dynamic_ncols=True) as bar:
        while batch["status"] not in FINAL:
            time.sleep(POLL_SECONDS)
            batch = _checked(client.get(f"batches/{batch['id']}"))
            counts = batch.get("request_counts") or {}
            bar.total = counts.get("total", 0)
            bar.n = counts.get("completed", 0) + counts.get("failed", 0)
            bar.set_postfix(failed=counts.get("failed", 0), status=batch["status"])
            bar.refresh()
    output_dir.mkdir(parents=True, exist_ok=True)
    for key, name in (("output_file_id", "output"), ("error_file_id", "errors")):
        target = output_dir / f"{batch['id']}_{name}.jsonl"
        if batch.get(key):
            with client.stream("GET", f"files/{batch[key]}/content") as response:
                if response.is_error:
                    response.read()
                    _checked(response)
                with target.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        else:
            target.write_bytes(b"")
        print(f"{name}: {target}")
    return batch


def main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(argv)
    with _client(args) as client:
        if args.command == "status":
            print(json.dumps(_checked(client.get(f"batches/{args.batch_id}")), indent=2))
            return
        with args.file.open("rb") as source:
            uploaded = _checked(
                client.post("files", data={"purpose": "batch"}, files={"file": (args.file.name, source)})
            )
        body = {"input_file_id": uploaded["id"], "endpoint": args.endpoint, "completion_window": args.completion_window}
        batch = _checked(client.post("batches", json=body))
        print(batch["id"], flush=True)
        if args.wait:
            batch = _follow(client, batch, args.output_dir)
            print(f"{batch['id']}: {batch['status']}")
            if batch["status"] != "completed":
                sys.exit(1)
