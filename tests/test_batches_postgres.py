"""Gateway replicas on one real PostgreSQL: any replica answers for any file or batch, and a batch
whose replica dies is taken over by another, every ``custom_id`` still delivered exactly once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import psycopg
import pytest

from tests.conftest import MODEL, sim_stats
from tests.postgres import PostgreSQL
from tests.servers import Server, free_port, until
from tests.test_batches import chat_line, finished, jsonl, lines_done, results, run_200_mb

Spawn = Callable[..., Server]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgreSQL]:
    server = PostgreSQL()
    server.start()
    yield server
    server.stop()


def replicas(spawn: Spawn, simulator: Server, url: str, **settings: str) -> tuple[Server, Server]:
    first, second = (spawn("gateway", simulator.url, database_url=url, **settings) for _ in range(2))
    return first, second


def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def test_any_replica_answers_for_any_file_or_batch(spawn: Spawn, simulator: Server, postgres: PostgreSQL) -> None:
    database = postgres.database()
    one, two = replicas(spawn, simulator, database)
    lines = [chat_line(f"req-{i}") for i in range(20)]
    padding = b"\n" * (3 * 1024 * 1024)  # blank lines: the input spans several chunks of the database
    with client(one) as first, client(two) as second:
        source = first.files.create(file=("in.jsonl", jsonl(lines[:10]) + padding + jsonl(lines[10:])), purpose="batch")
        assert second.files.retrieve(source.id).bytes == source.bytes
        assert second.files.content(source.id).read() == jsonl(lines[:10]) + padding + jsonl(lines[10:])
        assert [f.id for f in second.files.list()] == [source.id]
        batch = first.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = finished(second, batch.id)
        assert done.status == "completed" and [b.id for b in second.batches.list()] == [batch.id]
        output = results(second, done.output_file_id)
        assert sorted(r["custom_id"] for r in output) == sorted(line["custom_id"] for line in lines)
        assert second.files.delete(source.id).deleted
        with pytest.raises(openai.NotFoundError):
            first.files.retrieve(source.id)
    with psycopg.connect(database) as stored:  # a finished batch keeps its result files, not its lines
        assert stored.execute("SELECT count(*) FROM lines").fetchone() == (0,)
        assert stored.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        assert stored.execute("SELECT count(DISTINCT file_id) FROM chunks").fetchone() == (1,)  # the output


def test_a_batch_is_cancelled_through_another_replica(spawn: Spawn, simulator: Server, postgres: PostgreSQL) -> None:
    one, two = replicas(spawn, simulator, postgres.database(), batch_max_concurrent="2")
    lines = [chat_line(f"slow-{i}", sim_fault="delay=0.2") for i in range(40)]
    with client(one) as first, client(two) as second:
        source = first.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = first.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        until(lambda: lines_done(second, batch.id) > 0, "no line ran")
        assert second.batches.cancel(batch.id).status == "cancelling"
        assert first.batches.retrieve(batch.id).status == "cancelling"
        done = finished(first, batch.id)
        output, errors = results(first, done.output_file_id), results(first, done.error_file_id)
    assert done.status == "cancelled" and 0 < len(output) < 40
    assert sorted(r["custom_id"] for r in output + errors) == sorted(line["custom_id"] for line in lines)


def test_a_200_mb_input_streams_through_postgresql(
    spawn: Spawn, simulator: Server, postgres: PostgreSQL, tmp_path: Path
) -> None:
    gateway = spawn("gateway", simulator.url, database_url=postgres.database())
    assert run_200_mb(gateway, tmp_path) < 100  # the file in 1 MiB chunks, lines and results a page at a time


def test_a_restarted_database_is_reconnected_to(spawn: Spawn, simulator: Server, postgres: PostgreSQL) -> None:
    gateway = spawn("gateway", simulator.url, database_url=postgres.database())
    with client(gateway) as sdk:
        stored = sdk.files.create(file=("in.jsonl", jsonl([chat_line("x")])), purpose="batch")
        postgres.restart()
        failures = 0
        for _ in range(3):
            try:
                assert sdk.files.retrieve(stored.id).id == stored.id
            except openai.InternalServerError as refused:
                assert refused.status_code == 503  # the dropped connection, found on first use
                failures += 1
        assert failures <= 1


def handed_over(spawn: Spawn, postgres: PostgreSQL, how: signal.Signals, count: int) -> tuple[int, int, float]:
    """A batch of ``count`` slow lines run by one replica, stopped by ``how`` mid-batch; the other takes over.

    Returns the lines sent before the stop, in all, and the seconds until the other replica sent a line.
    """
    simulator = spawn("simulator")
    running, other = replicas(spawn, simulator, postgres.database(), batch_max_concurrent="2")
    lines = [chat_line(f"line-{i}", sim_fault="delay=0.1") for i in range(count)]
    with client(running) as first:
        source = first.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = first.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    until(lambda: sim_stats(simulator)["requests"].get("/v1/chat/completions", 0) > 0, "no line was sent")
    running.process.send_signal(how)
    assert running.process.wait(30) == (0 if how is signal.SIGTERM else -how)
    stopped, sent_before = time.monotonic(), sim_stats(simulator)["requests"]["/v1/chat/completions"]
    while sim_stats(simulator)["requests"]["/v1/chat/completions"] == sent_before:
        assert time.monotonic() - stopped < 60, "no replica took the batch over"
        time.sleep(0.1)
    taken_over = time.monotonic() - stopped
    with client(other) as second:
        done = finished(second, batch.id, seconds=120)
        output = results(second, done.output_file_id)
    assert done.status == "completed"
    assert sorted(r["custom_id"] for r in output) == sorted(line["custom_id"] for line in lines)
    return sent_before, sim_stats(simulator)["requests"]["/v1/chat/completions"], taken_over


def test_a_killed_replicas_batch_is_taken_over_within_30_seconds(spawn: Spawn, postgres: PostgreSQL) -> None:
    before, sent, taken_over = handed_over(spawn, postgres, signal.SIGKILL, 60)
    assert 0 < before < 60
    assert 60 <= sent <= 60 + 2  # only the lines in flight at the kill (2 at most) ran twice
    assert taken_over < 30


def test_a_stopped_replica_hands_its_batch_over_with_no_line_twice(spawn: Spawn, postgres: PostgreSQL) -> None:
    before, sent, taken_over = handed_over(spawn, postgres, signal.SIGTERM, 40)
    assert 0 < before < 40
    assert sent == 40  # the lines in flight finished and were recorded before the lease was given up
    assert taken_over < 15  # the lease was given up: no waiting for it to lapse


def test_an_unreachable_database_answers_503_and_never_shows_its_password(spawn: Spawn, simulator: Server) -> None:
    gateway = spawn("gateway", simulator.url, database_url=f"postgresql://app:pw-9f3e1@127.0.0.1:{free_port()}/db")
    with client(gateway) as sdk:
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.files.create(file=("in.jsonl", jsonl([chat_line("x")])), purpose="batch")
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "storage_unavailable"  # type: ignore[index]
        with pytest.raises(openai.InternalServerError):
            sdk.batches.list()
        assert sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]).choices
    until(lambda: "batch leases not renewed" in gateway.output, "the lease keeper never tried the database")
    gateway.stop()
    assert "pw-9f3e1" not in gateway.output and "storage_unavailable" in gateway.output
