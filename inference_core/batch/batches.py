"""Batches: OpenAI's Batch API over any backend, each line run through the engine like any request.

A batch's lines and their results live in SQLite beside the files; a line's result is recorded
before the line counts as done, and output and error files are written from those records at the
end. So a gateway killed in the middle resumes by itself at start-up: every line already done is
kept and not sent again; only lines in flight at the moment of the kill run twice.

Lines run at ``INFERENCE_BATCH_PRIORITY`` (a low priority by default), at most
``INFERENCE_BATCH_MAX_CONCURRENT`` at once, so batch work takes idle slots and yields them to
interactive requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

import orjson

from inference_core.batch.store import FileStore, StoredFile
from inference_core.endpoints import Endpoint
from inference_core.errors import Draining, InvalidRequest

log = logging.getLogger("inference_core")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body BLOB NOT NULL,
    status INTEGER,
    result BLOB,
    PRIMARY KEY (batch_id, line)
);
"""
#: A failed validation reports at most this many bad lines.
MAX_ERRORS = 1000
#: States in which a batch still has work for its runner ("expired" until its files are written).
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling", "expired")

#: Runs one line: the endpoint, the body, a request id; answers (status, body bytes).
LineRunner = Callable[[Endpoint, dict[str, Any], bytes, str], Awaitable[tuple[int, bytes]]]


class Batches:
    """Batch records and their lines, and the tasks running them."""

    def __init__(
        self,
        files: FileStore,
        *,
        endpoints: dict[str, Endpoint],
        run_line: LineRunner,
        routable: Callable[[str], bool],
        max_lines: int,
        max_concurrent: int,
        window: float,
    ) -> None:
        self.files = files
        self.endpoints = endpoints
        self.run_line = run_line
        self.routable = routable
        self.max_lines = max_lines
        self.max_concurrent = max_concurrent
        self.window = window
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        #: The batches this gateway is running, by id: their status (for metrics and /health).
        self.running: dict[str, str] = {}
        #: Called with "completed" or "failed" as each line's result is recorded.
        self.on_line: Callable[[str], None] | None = None
        files.schema(_SCHEMA)

    # Records.

    async def _save(self, record: dict[str, Any], owner: str | None) -> None:
        if _unfinished(record):
            self.running[record["id"]] = record["status"]
        else:
            self.running.pop(record["id"], None)

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO batches (id, owner, record) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                (record["id"], owner, orjson.dumps(record)),
            )

        await self.files.run(write)

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        def read(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT record FROM batches WHERE id = ? AND owner IS ?", (batch_id, owner)).fetchone()
            return _live(db, row[0]) if row else None

        return await self.files.run(read)

    async def page(self, owner: str | None, *, after: str | None, limit: int) -> list[dict[str, Any]]:
        """The owner's batches, newest first, after the batch ``after``."""

        def read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            where, args = "owner IS ?", [owner]
            if after is not None:
                where += " AND rowid < (SELECT rowid FROM batches WHERE id = ?)"
                args.append(after)
            rows = db.execute(f"SELECT record FROM batches WHERE {where} ORDER BY rowid DESC LIMIT ?", (*args, limit))
            return [_live(db, row[0]) for row in rows]

        return await self.files.run(read)

    # Life cycle.

    async def create(
        self, *, owner: str | None, input_file_id: str, endpoint: str, completion_window: str, metadata: object
    ) -> dict[str, Any]:
        if endpoint not in self.endpoints:
            raise InvalidRequest(f"Batches run {', '.join(self.endpoints)}, not '{endpoint}'.", param="endpoint")
        if completion_window != "24h":
            raise InvalidRequest("'completion_window' must be '24h'.", param="completion_window")
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidRequest("'metadata' must be an object of strings.", param="metadata")
        stored = await self.files.get(input_file_id, owner)
        if stored is None:
            raise InvalidRequest(f"No file with id '{input_file_id}' exists.", param="input_file_id")
        now = int(time.time())
        record: dict[str, Any] = {
            "id": "batch_" + secrets.token_hex(12),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": math.ceil(time.time() + self.window),  # a whole window, at least
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        await self._save(record, owner)
        self._start(record["id"], owner)
        return record

    async def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        record = await self.get(batch_id, owner)
        if record is None or record["status"] not in ("validating", "in_progress"):
            return record
        record |= {"status": "cancelling", "cancelling_at": int(time.time())}
        await self._save(record, owner)
        self._cancelled.add(batch_id)
        return record

    async def resume(self) -> None:
        """Start a runner for every batch a previous run of the gateway left unfinished."""

        def read(db: sqlite3.Connection) -> list[tuple[str, str | None]]:
            rows = db.execute("SELECT id, owner, record FROM batches").fetchall()
            return [(row[0], row[1]) for row in rows if _unfinished(orjson.loads(row[2]))]

        if not self.files.exists():
            return
        for batch_id, owner in await self.files.run(read):
            log.info("batch resumed", extra={"fields": {"batch": batch_id}})
            self._start(batch_id, owner)

    async def aclose(self, *, grace: float) -> None:
        """Let runners record the lines they have in flight (the gateway is draining: no new line
        starts), for at most ``grace`` seconds, then stop them."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, batch_id: str, owner: str | None) -> None:
        task = asyncio.create_task(self._run(batch_id, owner))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    # The runner.

    async def _run(self, batch_id: str, owner: str | None) -> None:
        try:
            record = await self.get(batch_id, owner)
            assert record is not None
            if record["status"] == "cancelling":
                self._cancelled.add(batch_id)  # cancelled before a restart: stays cancelled
            if record["status"] == "validating":
                record = await self._validate(record, owner)
            if record["status"] in ("in_progress", "cancelling"):
                record = await self._execute(record, owner)
            if record["status"] == "finalizing":
                await self._finalize(record, owner, "completed")
            elif record["status"] in ("cancelling", "expired"):
                await self._finalize(record, owner, "cancelled" if record["status"] == "cancelling" else "expired")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch runner failed", extra={"fields": {"batch": batch_id}})

    async def _validate(self, record: dict[str, Any], owner: str | None) -> dict[str, Any]:
        """Read the input, as OpenAI validates it: any bad line fails the whole batch, and nothing is sent."""
        path = self.files.path(record["input_file_id"])
        endpoint = record["endpoint"]

        def parse(db: sqlite3.Connection) -> list[dict[str, object]]:
            """Every line checked and stored in one transaction, kept only if no line is wrong.

            Read and written line by line: the input is never whole in memory.
            """
            errors: list[dict[str, object]] = []
            seen: set[str] = set()
            insert = "INSERT OR IGNORE INTO lines (batch_id, line, custom_id, body) VALUES (?, ?, ?, ?)"
            db.execute("BEGIN")
            try:
                with path.open("rb") as source:
                    for number, raw in enumerate(source, 1):
                        if not raw.strip():
                            continue
                        problem = _problem(raw, endpoint, seen, self.routable)
                        if problem is None and len(seen) > self.max_lines:
                            problem = ("too_many_lines", f"A batch holds at most {self.max_lines} lines.")
                        if problem is not None:
                            errors.append({"code": problem[0], "message": problem[1], "param": None, "line": number})
                            if len(errors) >= MAX_ERRORS:
                                break
                            continue
                        request = orjson.loads(raw)
                        db.execute(insert, (record["id"], number, request["custom_id"], orjson.dumps(request["body"])))
                if not errors and not seen:
                    errors.append({"code": "empty_file", "message": "The input file has no lines.", "param": None})
            finally:
                db.execute("ROLLBACK" if errors else "COMMIT")
            return errors

        errors = await self.files.run(parse)
        now = int(time.time())
        if errors:
            record |= {"status": "failed", "failed_at": now, "errors": {"object": "list", "data": errors}}
        elif record["id"] in self._cancelled:
            record |= {"status": "cancelling"}
        else:
            counts = await self._counts(record["id"])
            record |= {"status": "in_progress", "in_progress_at": now, "request_counts": counts}
        await self._save(record, owner)
        return record

    async def _pending(self, batch_id: str) -> list[int]:
        """The numbers of the lines not done yet (their bodies are read one at a time, when run)."""

        def read(db: sqlite3.Connection) -> list[int]:
            query = "SELECT line FROM lines WHERE batch_id = ? AND status IS NULL ORDER BY line"
            return [row[0] for row in db.execute(query, (batch_id,))]

        return await self.files.run(read)

    async def _line(self, batch_id: str, number: int) -> bytes:
        def read(db: sqlite3.Connection) -> bytes:
            query = "SELECT body FROM lines WHERE batch_id = ? AND line = ?"
            body: bytes = db.execute(query, (batch_id, number)).fetchone()[0]
            return body

        return await self.files.run(read)

    async def _record(self, batch_id: str, number: int, status: int, result: bytes) -> None:
        """A line's result, kept before the line counts as done (what makes a resume exactly-once)."""

        def write(db: sqlite3.Connection) -> None:
            query = "UPDATE lines SET status = ?, result = ? WHERE batch_id = ? AND line = ?"
            db.execute(query, (status, result, batch_id, number))

        await self.files.run(write)
        if self.on_line is not None:
            self.on_line("completed" if status < 300 else "failed")

    async def _counts(self, batch_id: str) -> dict[str, int]:
        return await self.files.run(lambda db: _counted(db, batch_id))

    async def _execute(self, record: dict[str, Any], owner: str | None) -> dict[str, Any]:
        batch_id = record["id"]
        endpoint = self.endpoints[record["endpoint"]]
        pending = await self._pending(batch_id)
        expires_at = record["expires_at"]
        numbers = iter(pending)  # shared by the workers: each line is taken once
        stopping = False

        async def worker() -> None:
            for number in numbers:
                if batch_id in self._cancelled or time.time() >= expires_at:
                    return
                body = await self._line(batch_id, number)
                try:
                    status, result = await self.run_line(endpoint, orjson.loads(body), body, f"{batch_id}-{number}")
                except Draining:
                    nonlocal stopping
                    stopping = True  # the line stays to do: the batch resumes when the gateway starts again
                    return

                await self._record(batch_id, number, status, result)

        await asyncio.gather(*(worker() for _ in range(self.max_concurrent)))
        latest = await self.get(batch_id, owner) or record
        counts = await self._counts(batch_id)
        if latest["status"] == "cancelling" or batch_id in self._cancelled:
            latest |= {"status": "cancelling", "request_counts": counts}
        elif stopping:
            return latest  # still in_progress: resumed at the next start
        elif counts["completed"] + counts["failed"] < counts["total"]:
            latest |= {"status": "expired", "request_counts": counts}  # the window closed on lines not run
        else:
            latest |= {"status": "finalizing", "finalizing_at": int(time.time()), "request_counts": counts}
        await self._save(latest, owner)
        return latest

    async def _finalize(self, record: dict[str, Any], owner: str | None, final: str) -> None:
        """Write the output and error files from the recorded results, in line order, then finish."""
        batch_id = record["id"]
        unrun = (
            {"code": "batch_expired", "message": "The batch's completion window ended before this line ran."}
            if final == "expired"
            else {"code": "batch_cancelled", "message": "The batch was cancelled before this line ran."}
        )

        def collect(db: sqlite3.Connection, output: IO[bytes], errors: IO[bytes]) -> None:
            """Both files written a row at a time (to temporary files on disk, never to memory)."""
            rows = db.execute(
                "SELECT line, custom_id, status, result FROM lines WHERE batch_id = ? ORDER BY line", (batch_id,)
            )
            for number, custom_id, status, result in rows:
                entry: dict[str, Any] = {"id": f"batch_req_{batch_id[6:]}_{number}", "custom_id": custom_id}
                if status is None:
                    entry |= {"response": None, "error": unrun}
                    errors.write(orjson.dumps(entry) + b"\n")
                    continue
                entry["response"] = {
                    "status_code": status,
                    "request_id": f"{batch_id}-{number}",
                    "body": orjson.loads(result),
                }
                entry["error"] = None
                (output if status < 300 else errors).write(orjson.dumps(entry) + b"\n")

        stored: dict[str, StoredFile | None] = {"output_file_id": None, "error_file_id": None}
        folder = self.files.folder
        with tempfile.TemporaryFile(dir=folder) as output, tempfile.TemporaryFile(dir=folder) as errors:
            await self.files.run(lambda db: collect(db, output, errors))
            for key, content, name in (("output_file_id", output, "output"), ("error_file_id", errors, "errors")):
                if content.tell():
                    content.seek(0)
                    filename = f"{batch_id}_{name}.jsonl"
                    stored[key] = await self.files.add(content, owner=owner, purpose="batch_output", filename=filename)
        now = int(time.time())
        record |= {key: value.id if value is not None else None for key, value in stored.items()}
        record |= {"status": final, f"{final}_at": now, "request_counts": await self._counts(batch_id)}
        await self._save(record, owner)


def _counted(db: sqlite3.Connection, batch_id: str) -> dict[str, int]:
    """The batch's ``request_counts``, from its lines as they stand."""
    query = "SELECT count(*), count(status), sum(status >= 300) FROM lines WHERE batch_id = ?"
    total, done, failed = db.execute(query, (batch_id,)).fetchone()
    return {"total": total, "completed": done - (failed or 0), "failed": failed or 0}


def _live(db: sqlite3.Connection, stored: bytes) -> dict[str, Any]:
    """A stored batch record, its counts brought up to date while its lines run."""
    record: dict[str, Any] = orjson.loads(stored)
    if record["status"] in ("in_progress", "cancelling", "finalizing"):
        record["request_counts"] = _counted(db, record["id"])
    return record


def _unfinished(record: dict[str, Any]) -> bool:
    return record["status"] in ACTIVE and not record["expired_at"]


def shown(record: dict[str, Any]) -> dict[str, Any]:
    """A batch as OpenAI's schema has it: fields not reached yet are left out, not null."""
    return {key: value for key, value in record.items() if value is not None}


def _problem(raw: bytes, endpoint: str, seen: set[str], routable: Callable[[str], bool]) -> tuple[str, str] | None:
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "invalid_json_line", "This line is not valid JSON."
    if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
        return "missing_required_parameter", "Each line needs a string 'custom_id'."
    if request["custom_id"] in seen:
        return "duplicate_custom_id", f"The custom_id '{request['custom_id']}' appears more than once."
    seen.add(request["custom_id"])
    if request.get("method") != "POST":
        return "invalid_method", "Each line's 'method' must be POST."
    if request.get("url") != endpoint:
        return "invalid_url", f"Each line's 'url' must be the batch's endpoint, {endpoint}."
    body = request.get("body")
    if not isinstance(body, dict):
        return "missing_required_parameter", "Each line needs a 'body' object."
    model = body.get("model")
    if not isinstance(model, str) or not routable(model):
        return "model_not_found", f"The model '{model}' is not served here."
    return None
