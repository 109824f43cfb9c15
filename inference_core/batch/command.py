"""``inference-core batch``: submit a JSONL file to a running gateway's Batch API and follow it.

    inference-core batch submit FILE.jsonl --endpoint /v1/chat/completions [--wait] [--output-dir D]
    inference-core batch status BATCH_ID

The gateway's URL comes from ``--base-url`` or ``OPENAI_BASE_URL`` and the key from
``--api-key`` or ``OPENAI_API_KEY``, as the OpenAI SDK reads them. With ``--wait`` it shows a
progress bar (done, failed, rate, time left) and, when the batch ends, writes the files the batch
has, ``<batch id>_output.jsonl`` and ``<batch id>_errors.jsonl``, into the output folder; a batch
that failed validation has neither, and its first errors are printed instead. The exit status is
0 when the batch completed.

A mistake (a gateway that cannot be reached, a URL that is not the gateway's, a file that cannot
be read, a refused key) ends the command with one line on stderr saying what happened and what
to do, and exit status 1: this is a tool for people, so a traceback would only hide the line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

PROGRAM = "inference-core batch"
DEFAULT_BASE_URL = "http://localhost:8080/v1"
FINAL = ("completed", "failed", "cancelled", "expired")
POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 60.0
#: Validation errors of a failed batch printed one a line; the rest are counted.
SHOWN_ERRORS = 10
_URL_HINT = f"--base-url (or OPENAI_BASE_URL) should be the gateway's API root, e.g. {DEFAULT_BASE_URL}"


class Failure(Exception):
    """Why the command stops: ``str()`` is the one line shown, saying what happened and what to do."""


def main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(argv)
    try:
        with _mapped_errors(args.base_url), _client(args) as client:
            _run(client, args)
    except Failure as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # The batch id was printed first thing, so the user can still follow a submitted batch.
        print(f"{PROGRAM}: interrupted; a batch already submitted goes on: see '{PROGRAM} status ID'", file=sys.stderr)
        raise SystemExit(130) from None


def _parser() -> argparse.ArgumentParser:
    # The gateway and the key, given after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
        help=f"the gateway's API root (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY", ""),
        help="a key the gateway accepts (default: $OPENAI_API_KEY)",
    )
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Submit a JSONL file to a running gateway's Batch API and follow it.",
        epilog=f"Run '{PROGRAM} submit --help' for the options. The gateway's address comes from --base-url "
        "or OPENAI_BASE_URL, the key from --api-key or OPENAI_API_KEY, as the OpenAI SDK reads them.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="upload FILE and start a batch on it",
        description="Upload FILE and start a batch on it; print the batch's id. With --wait, show its progress "
        "until it ends, then write BATCH_ID_output.jsonl and BATCH_ID_errors.jsonl (those the batch has) "
        "into --output-dir, or print the errors of a batch that failed validation. The exit status is 0 "
        "when the batch completed.",
    )
    submit.add_argument(
        "file", type=Path, metavar="FILE", help="the requests, one JSON object a line: custom_id, method, url, body"
    )
    submit.add_argument("--endpoint", required=True, help="the endpoint every line calls, e.g. /v1/chat/completions")
    submit.add_argument("--completion-window", default="24h", help="how long the batch may take (default: 24h)")
    submit.add_argument("--wait", action="store_true", help="follow the batch and download its results")
    submit.add_argument(
        "--output-dir", type=Path, default=Path("."), help="folder for the results (default: the current one)"
    )
    status = commands.add_parser(
        "status", parents=[common], help="print a batch", description="Print the batch BATCH_ID as JSON."
    )
    status.add_argument("batch_id", metavar="BATCH_ID", help="the id submit printed, e.g. batch_abc123")
    return parser


@contextlib.contextmanager
def _mapped_errors(base_url: str) -> Iterator[None]:
    """httpx's exceptions as Failures; the one place that translates them."""
    try:
        yield
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise Failure(f"cannot call {base_url!r} ({exc}); {_URL_HINT}") from None
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise Failure(
            f"cannot reach the gateway at {base_url} ({_reason(exc)}); start it, or point --base-url "
            "(or OPENAI_BASE_URL) at it"
        ) from None
    except httpx.TimeoutException:
        raise Failure(
            f"the gateway at {base_url} did not answer within {TIMEOUT_SECONDS:g} seconds; try again later"
        ) from None
    except httpx.TransportError as exc:
        raise Failure(f"the connection to {base_url} failed ({_reason(exc)}); {_URL_HINT}") from None


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.base_url.rstrip("/") + "/", headers=headers, timeout=TIMEOUT_SECONDS)


def _run(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.command == "status":
        print(json.dumps(_checked(client.get(f"batches/{args.batch_id}"), names_a_record=True), indent=2))
        return
    try:
        source = args.file.open("rb")
    except OSError as exc:
        raise Failure(f"cannot read {args.file}: {_reason(exc)}") from None
    with source:
        uploaded = _checked(client.post("files", data={"purpose": "batch"}, files={"file": (args.file.name, source)}))
    body = {"input_file_id": uploaded["id"], "endpoint": args.endpoint, "completion_window": args.completion_window}
    batch = _checked(client.post("batches", json=body))
    print(batch["id"], flush=True)
    if args.wait:
        batch = _follow(client, batch, args.output_dir)
        print(f"{batch['id']}: {batch['status']}")
        _print_errors(batch)
        if batch["status"] != "completed":
            sys.exit(1)


def _checked(response: httpx.Response, *, names_a_record: bool = False) -> dict[str, Any]:
    """The object the gateway answered with, or the Failure that says why there is none.

    ``names_a_record``: the path holds a batch's or a file's id, so the gateway's 404 means that
    record is not there; elsewhere a 404 means the URL is not the gateway's.
    """
    if response.is_error:
        raise _refusal(response, names_a_record=names_a_record)
    body = _json_object(response)
    if body is None or "id" not in body:  # a web page, a redirect: something other than the gateway
        raise Failure(
            f"{_request(response)} answered HTTP {response.status_code}, but not as the gateway's Batch API does; "
            f"{_URL_HINT}"
        )
    return body


def _refusal(response: httpx.Response, *, names_a_record: bool) -> Failure:
    """What a 4xx or 5xx means: the gateway's own message when it gave one, else what to check."""
    body = _json_object(response)
    error = body.get("error") if body else None
    message = error.get("message") if isinstance(error, dict) else None
    said = f": {' '.join(message.split())[:300]}" if isinstance(message, str) else ""
    status = f"HTTP {response.status_code}"
    if response.status_code in (401, 403):
        return Failure(
            f"the gateway refused the key ({status}{said}); give one it accepts with --api-key or OPENAI_API_KEY"
        )
    if not said or (response.status_code in (404, 405) and not names_a_record):
        what = "try again later" if response.is_server_error else f"this is not the gateway's Batch API; {_URL_HINT}"
        return Failure(f"{_request(response)} answered {status} {response.reason_phrase}: {what}")
    return Failure(f"{status}{said}")


def _follow(client: httpx.Client, batch: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar; then download the files it has."""
    with tqdm(total=0, unit="line", dynamic_ncols=True) as bar:
        while batch["status"] not in FINAL:
            time.sleep(POLL_SECONDS)
            batch = _checked(client.get(f"batches/{batch['id']}"), names_a_record=True)
            counts = batch.get("request_counts") or {}
            bar.total = counts.get("total", 0)
            bar.n = counts.get("completed", 0) + counts.get("failed", 0)
            bar.set_postfix(failed=counts.get("failed", 0), status=batch["status"])
            bar.refresh()
    for key, name in (("output_file_id", "output"), ("error_file_id", "errors")):
        if batch.get(key):
            target = output_dir / f"{batch['id']}_{name}.jsonl"
            _download(client, batch[key], target)
            print(f"{name}: {target}")
    return batch


def _download(client: httpx.Client, file_id: str, target: Path) -> None:
    with client.stream("GET", f"files/{file_id}/content") as response:
        if response.is_error:
            response.read()
            raise _refusal(response, names_a_record=True)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        except OSError as exc:
            raise Failure(f"cannot write {target}: {_reason(exc)}; choose another --output-dir") from None


def _print_errors(batch: dict[str, Any]) -> None:
    """A batch that failed validation ran none of its lines: show which lines to fix."""
    errors = (batch.get("errors") or {}).get("data") or []
    if batch["status"] != "failed" or not errors:
        return
    print(
        f"{PROGRAM}: {batch['id']} failed validation, so none of its lines ran; fix these and submit again:",
        file=sys.stderr,
    )
    for error in errors[:SHOWN_ERRORS]:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        print(f"  {where}{error.get('code')}: {error.get('message')}", file=sys.stderr)
    if len(errors) > SHOWN_ERRORS:
        print(f"  and {len(errors) - SHOWN_ERRORS} more", file=sys.stderr)


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:  # not JSON, or not text at all
        return None
    return body if isinstance(body, dict) else None


def _request(response: httpx.Response) -> str:
    return f"{response.request.method} {response.request.url}"


def _reason(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
