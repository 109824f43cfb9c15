"""Files kept by the gateway: their records in SQLite, their bytes on disk, under ``INFERENCE_DATA_DIR``.

SQLite is embedded (no server to run) and durable; its calls block, so they run on one thread
of their own, which also serialises them. Nothing is created until the first file arrives, so a
gateway that never stores a file needs no writable folder (the container runs read-only).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner);
"""
_COLUMNS = "id, owner, purpose, filename, bytes, created_at"
DATABASE = "gateway.sqlite3"


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    owner: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: int

    def openai(self) -> dict[str, object]:
        """OpenAI's ``OpenAIFile`` object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class FileStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="file-store")
        self._db: sqlite3.Connection | None = None
        self._schemas = [_SCHEMA]

    def schema(self, script: str) -> None:
        """More tables in the same database (the batches'), created with it."""
        self._schemas.append(script)

    def exists(self) -> bool:
        """Whether anything was ever stored (without creating the folder)."""
        return (self.folder / DATABASE).exists()

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` on the database, on the store's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: work(self._connection()))

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            (self.folder / "files").mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.folder / DATABASE, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            for script in self._schemas:
                self._db.executescript(script)
        return self._db

    def path(self, file_id: str) -> Path:
        return self.folder / "files" / file_id

    async def add(self, source: IO[bytes], *, owner: str | None, purpose: str, filename: str) -> StoredFile:
        """Copy ``source`` to disk and record it; the copy is written whole before it is listed."""
        file_id = "file-" + secrets.token_hex(12)

        def write(db: sqlite3.Connection) -> StoredFile:
            partial = self.path(file_id).with_suffix(".partial")
            with partial.open("wb") as target:
                shutil.copyfileobj(source, target, 1024 * 1024)
            partial.rename(self.path(file_id))
            stored = StoredFile(file_id, owner, purpose, filename, self.path(file_id).stat().st_size, int(time.time()))
            db.execute(f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", _row(stored))
            return stored

        return await self.run(write)

    async def get(self, file_id: str, owner: str | None) -> StoredFile | None:
        """The file, if it exists and belongs to ``owner`` (another key's files do not exist for it)."""

        def read(db: sqlite3.Connection) -> StoredFile | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ? AND owner IS ?", (file_id, owner)).fetchone()
            return StoredFile(*row) if row else None

        return await self.run(read)

    async def page(
        self, owner: str | None, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        """A page of ``owner``'s files in the order they came (rowid), starting after the file ``after``."""

        def read(db: sqlite3.Connection) -> list[StoredFile]:
            order = "DESC" if newest_first else "ASC"
            where, args = ["owner IS ?"], [owner]
            if purpose is not None:
                where.append("purpose = ?")
                args.append(purpose)
            if after is not None:
                where.append(f"rowid {'<' if newest_first else '>'} (SELECT rowid FROM files WHERE id = ?)")
                args.append(after)
            query = f"SELECT {_COLUMNS} FROM files WHERE {' AND '.join(where)} ORDER BY rowid {order} LIMIT ?"
            return [StoredFile(*row) for row in db.execute(query, (*args, limit))]

        return await self.run(read)

    async def delete(self, file_id: str, owner: str | None) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND owner IS ?", (file_id, owner)).rowcount
            if deleted:
                self.path(file_id).unlink(missing_ok=True)
            return bool(deleted)

        return await self.run(remove)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._db is not None:
            self._db.close()


def _row(stored: StoredFile) -> tuple[object, ...]:
    return (stored.id, stored.owner, stored.purpose, stored.filename, stored.bytes, stored.created_at)
