"""Files kept by the gateway: their records and bytes in its database (``batch.database``).

Nothing is created until the first file arrives, so a gateway that never stores a file needs
no writable folder (the container runs read-only).
"""

from __future__ import annotations

import functools
import itertools
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from inference_core.batch.database import Connection, Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    {rowid}
    id TEXT PRIMARY KEY,
    owner TEXT,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner);
"""
_COLUMNS = "id, owner, purpose, filename, bytes, created_at"


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
    def __init__(self, database: Database, scratch: Path) -> None:
        self.database = database
        self.run = database.run
        self._scratch = scratch
        database.schema(_SCHEMA)

    def scratch(self) -> IO[bytes]:
        """A temporary file in the data directory (the root file system may be read-only)."""
        self._scratch.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryFile(dir=self._scratch)

    async def add(self, source: IO[bytes], *, owner: str | None, purpose: str, filename: str) -> StoredFile:
        """Keep ``source`` and record it, in one transaction: a file is listed only once whole."""
        file_id = "file-" + secrets.token_hex(12)

        def write(db: Connection) -> StoredFile:
            with db.transaction():
                size = self.database.write(db, file_id, source)
                stored = StoredFile(file_id, owner, purpose, filename, size, int(time.time()))
                db.execute(f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", _row(stored))
            return stored

        return await self.run(write)

    async def get(self, file_id: str, owner: str | None) -> StoredFile | None:
        """The file, if it exists and belongs to ``owner`` (another key's files do not exist for it)."""

        def read(db: Connection) -> StoredFile | None:
            query = f"SELECT {_COLUMNS} FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ?"
            row = db.execute(query, (file_id, owner)).fetchone()
            return StoredFile(*row) if row else None

        return await self.run(read)

    async def content(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, a chunk at a time."""
        for index in itertools.count():
            chunk = await self.run(functools.partial(self.database.read, file_id=file_id, index=index))
            if not chunk:
                return
            yield chunk

    async def page(
        self, owner: str | None, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        """A page of ``owner``'s files in the order they came (rowid), starting after the file ``after``."""

        def read(db: Connection) -> list[StoredFile]:
            order = "DESC" if newest_first else "ASC"
            where, args = ["owner IS NOT DISTINCT FROM ?"], [owner]
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
        def remove(db: Connection) -> bool:
            with db.transaction():
                query = "DELETE FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ?"
                deleted = db.execute(query, (file_id, owner)).rowcount
                if deleted:
                    self.database.remove(db, file_id)
            return bool(deleted)

        return await self.run(remove)


def _row(stored: StoredFile) -> tuple[object, ...]:
    return (stored.id, stored.owner, stored.purpose, stored.filename, stored.bytes, stored.created_at)
