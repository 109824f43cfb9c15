"""Batches: OpenAI's Batch API over any backend, each line run through the engine like any request.

A batch's lines and their results live in the database beside the files; a line's result is
recorded before the line counts as done, and output and error files are written from those
records at the end. So a gateway killed in the middle loses nothing: whoever runs the batch next
(the same gateway started again, or with PostgreSQL another replica) sends only the lines not
recorded; just the lines in flight at the moment of the kill run twice.

Each unfinished batch has a row in ``runs``: the gateway running it and until when its lease
holds, by the database's clock (the gateways' clocks need not agree). The runner renews it
every third of ``LEASE_SECONDS``; a batch whose lease lapsed is taken by the first gateway to
notice (within ``LEASE_SECONDS`` and a third). A cancellation is a mark on that row, so any
replica may take it; the runner reads it with each line it starts.

Lines run at ``INFERENCE_BATCH_PRIORITY`` (a low priority by default), at most
``INFERENCE_BATCH_MAX_CONCURRENT`` at once, so batch work takes idle slots and yields them to
interactive requests; a line that cannot run yet (its key's limits, a full queue) waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import IO, Any

import orjson

from inference_core.batch.database import CHUNK_BYTES, Connection
from inference_core.batch.store import FileStore, StoredFile
from inference_core.endpoints import Endpoint
from inference_core.errors import Draining, InvalidRequest

log = logging.getLogger("inference_core")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    {rowid}
    id TEXT PRIMARY KEY,
    owner TEXT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body BYTEA NOT NULL,
    status INTEGER,
    result BYTEA,
    PRIMARY KEY (batch_id, line)
);
CREATE TABLE IF NOT EXISTS runs (
    batch_id TEXT PRIMARY KEY,
    runner TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    cancel_at BIGINT
);
"""
#: A batch record with the cancellation asked for it, if any.
_RECORD = "SELECT record, cancel_at FROM batches LEFT JOIN runs ON runs.batch_id = batches.id"
#: A failed validation reports at most this many bad lines.
MAX_ERRORS = 1000
#: Seconds a runner's lease on its batch lasts without renewal.
LEASE_SECONDS = 15.0
#: Rows read or written at a time when a batch's lines are stored or its results collected.
_PAGE = 500
#: Longest pause before a deferred line is tried again (cancellation and expiry are checked between).
_MAX_DEFER = 5.0

#: Runs one line: the endpoint, the body, its bytes, a request id, the owner; answers (status, body bytes).
LineRunner = Callable[[Endpoint, dict[str, Any], bytes, str, str | None], Awaitable[tuple[int, bytes]]]


class Deferred(Exception):
    """Raised by a ``LineRunner`` for a line that cannot run yet: it is tried again after ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


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
        lease: float = LEASE_SECONDS,
    ) -> None:
        self.files = files
        self.database = files.database
        self.endpoints = endpoints
        self.run_line = run_line
        self.routable = routable
        self.max_lines = max_lines
        self.max_concurrent = max_concurrent
        self.window = window
        self.lease = lease
        #: This gateway, as the runner named in the leases it holds.
        self.runner = secrets.token_hex(8)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._keeper: asyncio.Task[None] | None = None
        #: The batches this gateway is running, by id: their status (for metrics and /health).
        self.running: dict[str, str] = {}
        #: Called with "completed" or "failed" as each line's result is recorded.
        self.on_line: Callable[[str], None] | None = None
        self.database.schema(_SCHEMA)

    # Records.

    async def _save(self, record: dict[str, Any], owner: str | None) -> None:
        """Store the record; a finished batch's run (its lease) and its lines end with it."""
        finished = record["status"] in ("completed", "failed", "cancelled") or bool(record["expired_at"])
        if finished:
            self.running.pop(record["id"], None)
        else:
            self.running[record["id"]] = record["status"]

        def write(db: Connection) -> None:
            with db.transaction():
                db.execute(
                    "INSERT INTO batches (id, owner, record) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                    (record["id"], owner, orjson.dumps(record).decode()),
                )
                if finished:  # the result files hold what the lines held
                    db.execute("DELETE FROM runs WHERE batch_id = ?", (record["id"],))
                    db.execute("DELETE FROM lines WHERE batch_id = ?", (record["id"],))

        await self.database.run(write)

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        def read(db: Connection) -> dict[str, Any] | None:
            query = f"{_RECORD} WHERE id = ? AND owner IS NOT DISTINCT FROM ?"
            row = db.execute(query, (batch_id, owner)).fetchone()
            return _live(db, *row) if row else None

        return await self.database.run(read)

    async def page(self, owner: str | None, *, after: str | None, limit: int) -> list[dict[str, Any]]:
        """The owner's batches, newest first, after the batch ``after``."""

        def read(db: Connection) -> list[dict[str, Any]]:
            where, args = "owner IS NOT DISTINCT FROM ?", [owner]
            if after is not None:
                where += " AND batches.rowid < (SELECT rowid FROM batches WHERE id = ?)"
                args.append(after)
            rows = db.execute(f"{_RECORD} WHERE {where} ORDER BY batches.rowid DESC LIMIT ?", (*args, limit)).fetchall()
            return [_live(db, *row) for row in rows]

        return await self.database.run(read)

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
        lease = f"INSERT INTO runs VALUES (?, ?, {self.database.clock} + ?, NULL)"
        await self.database.run(lambda db: db.execute(lease, (record["id"], self.runner, self.lease)))
        await self._save(record, owner)
        self._start(record["id"], owner)
        return record

    async def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any] | None:
        """Mark the batch cancelled; its runner, on whichever gateway, starts no line after that."""

        def mark(db: Connection) -> dict[str, Any] | None:
            query = f"{_RECORD} WHERE id = ? AND owner IS NOT DISTINCT FROM ?"
            row = db.execute(query, (batch_id, owner)).fetchone()
            if row is None:
                return None
            if orjson.loads(row[0])["status"] in ("validating", "in_progress"):
                marked = "UPDATE runs SET cancel_at = ? WHERE batch_id = ? AND cancel_at IS NULL"
                db.execute(marked, (int(time.time()), batch_id))
                row = db.execute(query, (batch_id, owner)).fetchone()
            return _live(db, *row)

        record = await self.database.run(mark)
        if record is not None and record["status"] == "cancelling" and batch_id in self._tasks:
            self._cancelled.add(batch_id)  # run here: lines waiting for room stop waiting at once
        return record

    async def start(self) -> None:
        """Take up the batches left unfinished, then keep leases renewed and look for lapsed ones."""
        if not self.database.shared and self.database.exists():
            # The data directory is this gateway's alone: leases in it are a previous run's.
            await self.database.run(lambda db: db.execute("UPDATE runs SET lease_until = 0"))
        self._keeper = asyncio.create_task(self._keep())

    async def aclose(self, *, grace: float) -> None:
        """Let runners record the lines they have in flight (the gateway is draining: no new line
        starts), for at most ``grace`` seconds, then stop them and give up their leases at once."""
        if self._keeper is not None:
            self._keeper.cancel()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.database.exists():
            released = "UPDATE runs SET lease_until = 0 WHERE runner = ?"
            await self.database.run(lambda db: db.execute(released, (self.runner,)))

    def _start(self, batch_id: str, owner: str | None) -> None:
        task = asyncio.create_task(self._run(batch_id, owner))
        self._tasks[batch_id] = task

        def ended(_: object) -> None:
            self._tasks.pop(batch_id, None)
            self._cancelled.discard(batch_id)

        task.add_done_callback(ended)

    # Leases.

    async def _keep(self) -> None:
        while True:
            if self.database.exists():
                try:
                    await self._renew()
                except Exception as exc:  # the database is unreachable: runners go on, and so does this
                    log.warning("batch leases not renewed", extra={"fields": {"error": type(exc).__name__}})
            await asyncio.sleep(self.lease / 3)

    async def _renew(self) -> None:
        """Renew this gateway's leases, learn of cancellations and lost leases, take lapsed batches."""
        held = set(self._tasks)

        def work(db: Connection) -> tuple[list[str], list[str], list[tuple[str, str | None]]]:
            now: float = db.execute(f"SELECT {self.database.clock}").fetchone()[0]
            if held:
                marks = ", ".join("?" * len(held))
                renew = f"UPDATE runs SET lease_until = ? WHERE runner = ? AND batch_id IN ({marks})"
                db.execute(renew, (now + self.lease, self.runner, *held))
            claim = "UPDATE runs SET runner = ?, lease_until = ? WHERE batch_id = ? AND lease_until < ?"
            lost, cancelled, taken = [], [], []
            runs = "SELECT batch_id, owner, runner, lease_until, cancel_at FROM runs JOIN batches ON id = batch_id"
            for batch_id, owner, runner, lease_until, cancel_at in db.execute(runs).fetchall():
                if batch_id in held:
                    if runner != self.runner:
                        lost.append(batch_id)
                    elif cancel_at is not None:
                        cancelled.append(batch_id)
                elif lease_until < now and db.execute(claim, (self.runner, now + self.lease, batch_id, now)).rowcount:
                    taken.append((batch_id, owner))
            return lost, cancelled, taken

        lost, cancelled, taken = await self.database.run(work)
        self._cancelled.update(cancelled)
        for batch_id in lost:
            if (task := self._tasks.get(batch_id)) is not None:
                log.warning("batch lease lost", extra={"fields": {"batch": batch_id}})
                task.cancel()  # another gateway runs it now
                self.running.pop(batch_id, None)
        for batch_id, owner in taken:
            log.info("batch resumed", extra={"fields": {"batch": batch_id}})
            self._start(batch_id, owner)

    # The runner.

    async def _run(self, batch_id: str, owner: str | None) -> None:
        try:
            record = await self.get(batch_id, owner)
            assert record is not None
            if record["status"] == "cancelling":
                self._cancelled.add(batch_id)  # cancelled before this runner took the batch
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
        """Read the input, as OpenAI validates it: any bad line fails the whole batch, and nothing is sent.

        The input is read a chunk at a time and its lines are stored a page at a time, between the
        database's other calls (it is never whole in memory, nor the database busy with it for
        long); if any line is wrong, the lines stored go with the failed batch.
        """
        batch_id, endpoint = record["id"], record["endpoint"]
        errors: list[dict[str, object]] = []
        seen: set[str] = set()
        page: list[tuple[object, ...]] = []
        held = 0  # bytes in the page: lines may be large
        async with contextlib.aclosing(_split(self.files.content(record["input_file_id"]))) as lines:
            number = 0
            async for raw in lines:
                number += 1
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
                if errors:
                    continue  # the batch fails: only the other bad lines matter now
                request = orjson.loads(raw)
                page.append((batch_id, number, request["custom_id"], orjson.dumps(request["body"])))
                held += len(raw)
                if len(page) == _PAGE or held > CHUNK_BYTES:
                    await self._store(page)
                    page, held = [], 0
        if await self.files.get(record["input_file_id"], owner) is None:
            # Deleted while being read: what was read may be cut short, so nothing else found holds.
            message = "The input file was deleted before the batch had read it."
            errors = [{"code": "invalid_file", "message": message, "param": "input_file_id"}]
        elif not errors and not seen:
            errors.append({"code": "empty_file", "message": "The input file has no lines.", "param": None})
        if page and not errors:
            await self._store(page)  # (a failed batch's lines go when it is saved as failed)
        now = int(time.time())
        latest = await self.get(batch_id, owner) or record
        if errors:
            record |= {"status": "failed", "failed_at": now, "errors": {"object": "list", "data": errors}}
        elif latest["status"] == "cancelling":
            record = latest
        else:
            counts = await self._counts(batch_id)
            record |= {"status": "in_progress", "in_progress_at": now, "request_counts": counts}
        await self._save(record, owner)
        return record

    async def _store(self, page: list[tuple[object, ...]]) -> None:
        """Lines checked, kept to run (again after a restart in the middle of validation: kept once)."""
        insert = "INSERT INTO lines (batch_id, line, custom_id, body) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
        await self.database.run(lambda db: db.executemany(insert, page))

    async def _pending(self, batch_id: str) -> list[int]:
        """The numbers of the lines not done yet (their bodies are read one at a time, when run)."""

        def read(db: Connection) -> list[int]:
            query = "SELECT line FROM lines WHERE batch_id = ? AND status IS NULL ORDER BY line"
            return [row[0] for row in db.execute(query, (batch_id,))]

        return await self.database.run(read)

    async def _line(self, batch_id: str, number: int) -> tuple[bytes, bool]:
        """A line's body, and whether the batch was cancelled meanwhile (through any gateway)."""

        def read(db: Connection) -> tuple[bytes, bool]:
            query = "SELECT body, cancel_at FROM lines LEFT JOIN runs USING (batch_id) WHERE batch_id = ? AND line = ?"
            body, cancel_at = db.execute(query, (batch_id, number)).fetchone()
            return bytes(body), cancel_at is not None

        return await self.database.run(read)

    async def _record(self, batch_id: str, number: int, status: int, result: bytes) -> None:
        """A line's result, kept before the line counts as done (what makes a resume exactly-once)."""

        def write(db: Connection) -> int:
            query = "UPDATE lines SET status = ?, result = ? WHERE batch_id = ? AND line = ? AND status IS NULL"
            return db.execute(query, (status, result, batch_id, number)).rowcount

        if await self.database.run(write) and self.on_line is not None:
            self.on_line("completed" if status < 300 else "failed")

    async def _counts(self, batch_id: str) -> dict[str, int]:
        return await self.database.run(lambda db: _counted(db, batch_id))

    async def _execute(self, record: dict[str, Any], owner: str | None) -> dict[str, Any]:
        batch_id = record["id"]
        endpoint = self.endpoints[record["endpoint"]]
        pending = await self._pending(batch_id)
        expires_at = record["expires_at"]
        numbers = iter(pending)  # shared by the workers: each line is taken once
        stopping = False

        async def worker() -> None:
            nonlocal stopping
            for number in numbers:
                body, cancelled = await self._line(batch_id, number)
                if cancelled:
                    self._cancelled.add(batch_id)
                while True:
                    if batch_id in self._cancelled or time.time() >= expires_at:
                        return
                    try:
                        status, result = await self.run_line(
                            endpoint, orjson.loads(body), body, f"{batch_id}-{number}", owner
                        )
                        break
                    except Deferred as later:
                        await asyncio.sleep(min(later.seconds, _MAX_DEFER))
                    except Draining:
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

        def collect(db: Connection, output: IO[bytes], errors: IO[bytes]) -> None:
            """Both files written a page of rows at a time (to temporary files on disk, never to memory)."""
            query = "SELECT line, custom_id, status, result FROM lines WHERE batch_id = ? AND line > ? ORDER BY line"
            last = 0
            while rows := db.execute(f"{query} LIMIT {_PAGE}", (batch_id, last)).fetchall():
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
                last = rows[-1][0]

        stored: dict[str, StoredFile | None] = {"output_file_id": None, "error_file_id": None}
        with self.files.scratch() as output, self.files.scratch() as errors:
            await self.database.run(lambda db: collect(db, output, errors))
            for key, content, name in (("output_file_id", output, "output"), ("error_file_id", errors, "errors")):
                if content.tell():
                    content.seek(0)
                    filename = f"{batch_id}_{name}.jsonl"
                    stored[key] = await self.files.add(content, owner=owner, purpose="batch_output", filename=filename)
        now = int(time.time())
        record |= {key: value.id if value is not None else None for key, value in stored.items()}
        record |= {"status": final, f"{final}_at": now, "request_counts": await self._counts(batch_id)}
        await self._save(record, owner)


async def _split(chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """The lines of a file given in chunks (a line may span chunks)."""
    rest = b""
    async for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line
    if rest:
        yield rest


def _counted(db: Connection, batch_id: str) -> dict[str, int]:
    """The batch's ``request_counts``, from its lines as they stand."""
    failed = "sum(CASE WHEN status >= 300 THEN 1 ELSE 0 END)"
    query = f"SELECT count(*), count(status), {failed} FROM lines WHERE batch_id = ?"
    total, done, failed = db.execute(query, (batch_id,)).fetchone()
    return {"total": total, "completed": done - (failed or 0), "failed": int(failed or 0)}


def _live(db: Connection, stored: str, cancel_at: int | None) -> dict[str, Any]:
    """A stored batch record as it stands: cancelling once asked, its counts up to date while it runs."""
    record: dict[str, Any] = orjson.loads(stored)
    if cancel_at is not None and record["status"] in ("validating", "in_progress"):
        record |= {"status": "cancelling", "cancelling_at": cancel_at}
    if record["status"] in ("in_progress", "cancelling", "finalizing"):
        record["request_counts"] = _counted(db, record["id"])
    return record


def shown(record: dict[str, Any]) -> dict[str, Any]:
    """A batch as OpenAI's schema has it: fields not reached yet are left out, not null.

    A batch whose window closed is stored as expired before its files are written (so that a
    restart finishes it as expired), and shows as finalizing until they are.
    """
    if record["status"] == "expired" and not record["expired_at"]:
        record = record | {"status": "finalizing"}
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
