"""OpenAI's Batch API through the official SDK: lines run through the engine, results kept, resumed after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from inference_core.batch.batches import shown
from tests.conftest import MODEL, sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server, free_port, metric, start_fleet, start_gateway, until

Spawn = Callable[..., Server]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_line(custom_id: str, **body: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": custom_id}], "max_tokens": 3, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def finished(client: openai.OpenAI, batch_id: str, seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def lines_done(client: openai.OpenAI, batch_id: str) -> int:
    """The lines of a running batch that have their result."""
    counts = client.batches.retrieve(batch_id).request_counts
    return 0 if counts is None else counts.completed + counts.failed


def results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [] if file_id is None else [orjson.loads(line) for line in client.files.content(file_id).read().splitlines()]


def test_a_batch_runs_every_line_once(spawn: Spawn, simulator: Server, tmp_path: Path, schemas: OpenAISchemas) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path))
    lines = [chat_line(f"req-{i}") for i in range(20)] + [chat_line("refused", sim_fault="status=400")]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "t"}
        )
        schemas.validate("Batch", batch.model_dump(mode="json", exclude_unset=True))
        done = finished(client, batch.id)
        schemas.validate("Batch", done.model_dump(mode="json", exclude_unset=True))
        assert done.status == "completed" and done.metadata == {"job": "t"}
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (21, 20, 1)
        output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
        assert sorted(r["custom_id"] for r in output) == sorted(f"req-{i}" for i in range(20))
        assert all(
            r["response"]["status_code"] == 200 and r["response"]["body"]["object"] == "chat.completion" for r in output
        )
        assert [(r["custom_id"], r["response"]["status_code"]) for r in errors] == [("refused", 400)]
        assert [b.id for b in client.batches.list()] == [batch.id]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'inference_core_batch_lines_total{status="completed"} 20.0' in metrics
    assert 'inference_core_batch_lines_total{status="failed"} 1.0' in metrics
    assert 'inference_core_batches{status="in_progress"} 0.0' in metrics
    assert httpx.get(gateway.url + "/health").json()["batches"] == {"running": 0}


def test_a_bad_input_fails_the_batch_and_sends_nothing(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path))
    bad = (
        jsonl([chat_line("a"), chat_line("a")])
        + b"{not json\n"
        + jsonl([{**chat_line("b"), "url": "/v1/embeddings"}, chat_line("c", model="no-such-model")])
    )
    before = sim_stats(simulator)["requests"].get("/v1/chat/completions", 0)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        source = client.files.create(file=("bad.jsonl", bad), purpose="batch")
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        failed = finished(client, batch.id)
    assert failed.status == "failed" and failed.errors is not None
    found = [(e.code, e.line) for e in failed.errors.data or []]
    assert found == [("duplicate_custom_id", 2), ("invalid_json_line", 3), ("invalid_url", 4), ("model_not_found", 5)]
    assert sim_stats(simulator)["requests"].get("/v1/chat/completions", 0) == before


def test_an_input_deleted_while_validated_fails_the_batch(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path))
    lines = [chat_line(f"l{i}", messages=[{"role": "user", "content": "x" * 99_800}]) for i in range(400)]
    before = sim_stats(simulator)["requests"].get("/v1/chat/completions", 0)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert client.files.delete(source.id).deleted  # 40 MB take the validation far longer than this
        failed = finished(client, batch.id)
    assert failed.status == "failed" and failed.errors is not None
    assert [(e.code, e.param) for e in failed.errors.data or []] == [("invalid_file", "input_file_id")]
    assert sim_stats(simulator)["requests"].get("/v1/chat/completions", 0) == before  # a cut-short input never runs


def test_cancel_delivers_what_is_done(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path), batch_max_concurrent="2")
    lines = [chat_line(f"slow-{i}", sim_fault="delay=0.2") for i in range(30)]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        until(lambda: lines_done(client, batch.id) > 0, "no line ran")
        assert 'inference_core_batches{status="in_progress"} 1.0' in httpx.get(gateway.url + "/metrics").text
        assert httpx.get(gateway.url + "/health").json()["batches"] == {"running": 1}
        assert client.batches.cancel(batch.id).status == "cancelling"
        done = finished(client, batch.id)
        output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    assert done.status == "cancelled" and 0 < len(output) < 30
    assert sorted(r["custom_id"] for r in output + errors) == sorted(line["custom_id"] for line in lines)
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}


def test_batches_belong_to_their_key(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path), gateway_api_keys="sk-one-1,sk-two-2")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-one-1", max_retries=0) as one:
        source = one.files.create(file=("in.jsonl", jsonl([chat_line("x")])), purpose="batch")
        batch = one.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-two-2", max_retries=0) as two:
        with pytest.raises(openai.NotFoundError):
            two.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            two.batches.cancel(batch.id)
        assert list(two.batches.list()) == []
        with pytest.raises(openai.BadRequestError):  # another key's file is no file at all
            two.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_lines_count_against_their_keys_limits_and_wait_for_them(
    log_dir: Path, simulator: Server, tmp_path: Path
) -> None:
    """A key allowed 4 requests per 2 s window: its batch of 10 lines waits for windows, none fails."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"limit_window: 2\nmodel: {MODEL}\nbackends:\n  local: {{base_url: {simulator.url}/v1}}\n"
        "keys:\n  team: {key: sk-team-5c1e, rpm: 4}\n"
    )
    gateway = start_fleet(log_dir, config, data_dir=str(tmp_path))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-team-5c1e", max_retries=0) as client:
            source = client.files.create(
                file=("in.jsonl", jsonl([chat_line(f"r{i}") for i in range(10)])), purpose="batch"
            )
            started = time.monotonic()
            batch = client.batches.create(
                input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = finished(client, batch.id)
            elapsed = time.monotonic() - started
    finally:
        gateway.stop()
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (10, 0)
    assert elapsed >= 1.9  # three windows: 4 lines, 4 lines, 2 lines (unlimited, 10 lines take milliseconds)


def test_a_batch_whose_key_is_removed_stops_spending(log_dir: Path, simulator: Server, tmp_path: Path) -> None:
    """The key leaves the configuration mid-batch: its remaining lines fail with invalid_api_key, none is sent."""
    config = tmp_path / "gateway.yaml"
    fleet = (
        f"model: {MODEL}\nbackends:\n  local: {{base_url: {simulator.url}/v1}}\nkeys:\n  other: {{key: sk-other-1}}\n"
    )
    config.write_text(fleet + "  team: {key: sk-team-2}\n")
    gateway = start_fleet(log_dir, config, data_dir=str(tmp_path), batch_max_concurrent="1")

    def reload(text: str, key_works: bool) -> None:
        config.write_text(text)
        os.kill(gateway.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (
            httpx.get(gateway.url + "/v1/models", headers={"authorization": "Bearer sk-team-2"}).status_code == 200
        ) != key_works:
            assert time.monotonic() < deadline, gateway.output
            time.sleep(0.05)

    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-team-2", max_retries=0) as client:
            lines = [chat_line(f"s{i}", sim_fault="delay=0.2") for i in range(40)]
            source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = client.batches.create(
                input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            until(lambda: lines_done(client, batch.id) > 0, "no line ran")
            reload(fleet, key_works=False)
            sent = sim_stats(simulator)["requests"]["/v1/chat/completions"]
            until(
                lambda: metric(gateway, "inference_core_batch_lines_total") == 40,  # completed or failed
                "the rest of the batch never ran into the missing key",
            )
            reload(fleet + "  team: {key: sk-team-2}\n", key_works=True)
            done = finished(client, batch.id)
            errors = results(client, done.error_file_id)
    finally:
        gateway.stop()
    assert done.status == "completed" and errors
    assert {r["response"]["body"]["error"]["code"] for r in errors} == {"invalid_api_key"}
    assert sim_stats(simulator)["requests"]["/v1/chat/completions"] <= sent + 1  # at most the line in flight


def test_a_200_mb_input_runs_with_the_gateways_memory_bounded(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path / "data"))
    assert run_200_mb(gateway, tmp_path) < 100


def run_200_mb(gateway: Server, tmp_path: Path) -> float:
    """2,000 lines of 100 kB uploaded, validated, run and written out; the growth of the gateway's peak RSS in MB."""
    before = peak_rss_mb(gateway.process.pid)
    source = tmp_path / "big.jsonl"
    with source.open("wb") as target:
        for i in range(2000):
            line = orjson.dumps(chat_line(f"big-{i}", messages=[{"role": "user", "content": "x" * 99_800}]))
            target.write(line + b"\n")
    assert 199_000_000 < source.stat().st_size <= 200_000_000
    with source.open("rb") as upload, openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused") as client:
        stored = client.files.create(file=("big.jsonl", upload), purpose="batch")
        batch = client.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = finished(client, batch.id, seconds=600)
        output = results(client, done.output_file_id)
    assert stored.bytes == source.stat().st_size and done.status == "completed"
    assert sorted(r["custom_id"] for r in output) == sorted(f"big-{i}" for i in range(2000))
    return peak_rss_mb(gateway.process.pid) - before


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def interrupted(log_dir: Path, spawn: Spawn, tmp_path: Path, count: int, how: signal.Signals) -> tuple[int, int]:
    """A batch of ``count`` slow lines, its gateway stopped by ``how`` mid-batch, then started again.

    Returns the lines sent before the stop and in all; checks every ``custom_id`` came back once.
    """
    simulator = spawn("simulator")
    settings = {"data_dir": str(tmp_path), "batch_max_concurrent": "2"}
    gateway = start_gateway(log_dir, simulator.url, **settings)
    lines = [chat_line(f"line-{i}", sim_fault="delay=0.1") for i in range(count)]
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
            source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = client.batches.create(
                input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        until(lambda: sim_stats(simulator)["requests"].get("/v1/chat/completions", 0) > 0, "no line was sent")
        gateway.process.send_signal(how)
        assert gateway.process.wait(30) == (0 if how is signal.SIGTERM else -how)  # SIGTERM: a clean exit
        sent_before = sim_stats(simulator)["requests"]["/v1/chat/completions"]
    finally:
        gateway.stop()
    again = start_gateway(log_dir, simulator.url, **settings)
    try:
        with openai.OpenAI(base_url=again.url + "/v1", api_key="unused", max_retries=0) as client:
            done = finished(client, batch.id)
            output = results(client, done.output_file_id)
    finally:
        again.stop()
    assert done.status == "completed"
    assert sorted(r["custom_id"] for r in output) == sorted(line["custom_id"] for line in lines)
    return sent_before, sim_stats(simulator)["requests"]["/v1/chat/completions"]


def test_a_killed_gateway_resumes_its_batch_without_sending_a_line_twice(
    log_dir: Path, spawn: Spawn, tmp_path: Path
) -> None:
    before, sent = interrupted(log_dir, spawn, tmp_path, 40, signal.SIGKILL)
    assert 0 < before < 40
    assert 40 <= sent <= 40 + 2  # only the lines in flight at the kill (2 at most) ran twice


def test_sigterm_stops_starting_lines_and_the_batch_resumes_with_none_twice(
    log_dir: Path, spawn: Spawn, tmp_path: Path
) -> None:
    before, sent = interrupted(log_dir, spawn, tmp_path, 30, signal.SIGTERM)
    assert 0 < before < 30
    assert sent == 30  # lines in flight at SIGTERM finished and were recorded: none ran twice


def test_batch_routes_refuse_what_they_do_not_know(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path))
    url = gateway.url + "/v1/batches"
    assert httpx.get(url + "/batch_nope").status_code == 404
    assert httpx.delete(url + "/batch_nope").status_code == 405
    body = {"input_file_id": "file-x", "endpoint": "/v1/moderations", "completion_window": "24h"}
    assert httpx.post(url, json=body).json()["error"]["param"] == "endpoint"
    assert (
        httpx.post(url, json={**body, "endpoint": "/v1/chat/completions"}).json()["error"]["param"] == "input_file_id"
    )


def test_lines_not_run_when_the_window_closes_expire(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    # The window closes 2 to 3 s in (at a whole second), long before the 12 lines' 6 s.
    gateway = spawn(
        "gateway", simulator.url, data_dir=str(tmp_path), batch_max_concurrent="1", batch_window_seconds="2"
    )
    lines = [chat_line(f"late-{i}", sim_fault="delay=0.5") for i in range(12)]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = finished(client, batch.id)
        output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    assert done.status == "expired" and done.expired_at is not None
    assert 0 < len(output) < 12 and {r["error"]["code"] for r in errors} == {"batch_expired"}
    assert sorted(r["custom_id"] for r in output + errors) == sorted(line["custom_id"] for line in lines)


def test_the_batch_command_submits_follows_and_downloads(spawn: Spawn, simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path / "data"), gateway_api_keys="sk-cli-key")
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line(f"cli-{i}") for i in range(5)] + [chat_line("bad", sim_fault="status=400")]))
    env = {**os.environ, "OPENAI_BASE_URL": gateway.url + "/v1", "OPENAI_API_KEY": "sk-cli-key"}
    command = [sys.executable, "-m", "inference_core", "batch", "submit", str(source)]
    done = subprocess.run(
        [*command, "--endpoint", "/v1/chat/completions", "--wait", "--output-dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.splitlines()[0]
    output = (tmp_path / "out" / f"{batch_id}_output.jsonl").read_bytes().splitlines()
    errors = (tmp_path / "out" / f"{batch_id}_errors.jsonl").read_bytes().splitlines()
    assert sorted(orjson.loads(line)["custom_id"] for line in output) == [f"cli-{i}" for i in range(5)]
    assert [orjson.loads(line)["custom_id"] for line in errors] == ["bad"]
    status = subprocess.run(
        [sys.executable, "-m", "inference_core", "batch", "status", batch_id],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and orjson.loads(status.stdout)["status"] == "completed"
    wrong_key = subprocess.run(
        [sys.executable, "-m", "inference_core", "batch", "status", batch_id, "--api-key", "sk-other"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert one_line(wrong_key) == (
        "inference-core batch: the gateway refused the key (HTTP 401: Invalid or missing API key.); "
        "give one it accepts with --api-key or OPENAI_API_KEY"
    )


def batch_command(*args: str) -> subprocess.CompletedProcess[str]:
    """``inference-core batch ARGS`` as a person runs it, with no OPENAI_* variables to lean on."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    command = [str(Path(sys.executable).parent / "inference-core"), "batch", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr, having checked it failed with nothing else said."""
    assert result.returncode == 1, result
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip()


def test_the_batch_command_names_each_mistake_in_one_line(gateway: Server, simulator: Server, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line("one")]))
    submit = ["submit", str(source), "--endpoint", "/v1/chat/completions", "--api-key", "sk-any"]
    closed = f"http://127.0.0.1:{free_port()}/v1"
    fix_url = "--base-url (or OPENAI_BASE_URL) should be the gateway's API root, e.g. http://localhost:8080/v1"
    not_the_api = f"answered HTTP 404 Not Found: this is not the gateway's Batch API; {fix_url}"
    mistakes = [
        (
            ["status", "batch_x", "--base-url", closed],
            f"cannot reach the gateway at {closed} ([Errno 111] Connection refused); "
            "start it, or point --base-url (or OPENAI_BASE_URL) at it",
        ),
        ([*submit, "--base-url", gateway.url], f"POST {gateway.url}/files {not_the_api}"),
        ([*submit, "--base-url", simulator.url], f"POST {simulator.url}/files {not_the_api}"),
        (
            [*submit, "--base-url", "localhost:8080/v1"],
            f"cannot call 'localhost:8080/v1' (Request URL has an unsupported protocol 'localhost://'.); {fix_url}",
        ),
        (
            ["submit", str(tmp_path / "absent.jsonl"), "--endpoint", "/v1/chat/completions", "--base-url", closed],
            f"cannot read {tmp_path / 'absent.jsonl'}: No such file or directory",
        ),
        (
            ["submit", str(tmp_path), "--endpoint", "/v1/chat/completions", "--base-url", closed],
            f"cannot read {tmp_path}: Is a directory",
        ),
        (
            ["status", "batch_nope", "--base-url", gateway.url + "/v1"],
            "HTTP 404: No batch with id 'batch_nope' exists.",
        ),
    ]
    for args, expected in mistakes:
        assert one_line(batch_command(*args)) == f"inference-core batch: {expected}"


def test_the_batch_command_shows_why_a_batch_failed_validation(gateway: Server, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line("twice")] * 14))
    output_dir = tmp_path / "out"
    failed = batch_command(
        "submit", str(source), "--endpoint", "/v1/chat/completions", "--wait", "--output-dir", str(output_dir),
        "--base-url", gateway.url + "/v1", "--api-key", "sk-any",
    )  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    batch_id = failed.stdout.splitlines()[0]
    assert failed.stdout.splitlines()[1:] == [f"{batch_id}: failed"]
    shown = failed.stderr.splitlines()[-12:]
    assert shown[0] == (
        f"inference-core batch: {batch_id} failed validation, so none of its lines ran; fix these and submit again:"
    )
    assert [line.split(":")[:2] for line in shown[1:11]] == [
        [f"  line {n}", " duplicate_custom_id"] for n in range(2, 12)
    ]
    assert shown[11] == "  and 3 more"
    assert not output_dir.exists()  # no empty result files


def test_the_batch_commands_help_is_plain_text() -> None:
    for command in ([], ["submit"], ["status"]):
        result = batch_command(*command, "--help")
        assert result.returncode == 0 and result.stdout.startswith("usage: inference-core batch")
        assert "``" not in result.stdout and ":class:" not in result.stdout and "<" not in result.stdout


def test_an_expiring_batch_shows_finalizing_until_its_files_are_written() -> None:
    record = {"id": "batch_x", "status": "expired", "expired_at": None, "output_file_id": None}
    assert shown(record) == {"id": "batch_x", "status": "finalizing"}
    assert shown(record | {"expired_at": 5, "output_file_id": "file-1"})["status"] == "expired"
