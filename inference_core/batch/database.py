"""Where files and batches are kept: SQLite in the data directory, or PostgreSQL shared by replicas.

Either is reached through one blocking connection on a thread of its own, which also serialises
the calls. The same SQL runs on both: queries use ``?`` placeholders and a ``rowid`` for the
order rows came in (SQLite's own; PostgreSQL gets a column of that name). What differs is said
once here: how to connect, and where a file's bytes go (a file in the data directory beside
SQLite; chunks in a table in PostgreSQL, so that every replica can read them).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from inference_core.errors import StorageUnavailable

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")
#: How much of a file is read, written or relayed at a time.
CHUNK_BYTES = 1024 * 1024
#: The SQLite database, in the data directory.
DATABASE = "gateway.sqlite3"


class Rows(Protocol):
    """What a query answers, as both drivers' cursors have it."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    def execute(self, query: str, args: Sequence[object] = ()) -> Rows: ...

    def executemany(self, query: str, rows: Sequence[Sequence[object]]) -> None: ...

    def transaction(self) -> Any:
        """A context in which every statement commits together, or none does."""
        ...


class Database(ABC):
    """One connection, used on the database's own thread."""

    #: Whether other gateways use the same data (then a batch is run under a lease).
    shared = False
    #: The database's time, in seconds since the epoch, as SQL: leases are timed by one clock.
    clock = ""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="database")
        self._connection: Connection | None = None
        self._schemas: list[str] = []

    def schema(self, script: str) -> None:
        """Tables created with the database (``{rowid}`` where a table's rows need an order)."""
        self._schemas.append(script)

    def exists(self) -> bool:
        """Whether anything may have been stored (without creating anything)."""
        return True

    async def run(self, work: Callable[[Connection], T]) -> T:
        """``work`` on the connection, on the database's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, work)

    def _call(self, work: Callable[[Connection], T]) -> T:
        try:
            if self._connection is None:
                self._connection = self._connect()
            return work(self._connection)
        except self._failures() as exc:
            if self._broken():
                self._connection = None  # connect again on the next call
            raise StorageUnavailable(self._unavailable(exc)) from None

    @abstractmethod
    def _connect(self) -> Connection: ...

    @abstractmethod
    def _failures(self) -> tuple[type[Exception], ...]:
        """The driver's errors that say the database cannot be used now (not that a query is wrong)."""

    @abstractmethod
    def _unavailable(self, exc: Exception) -> str:
        """What the client is told (never the connection's details, which may hold a password)."""

    def _broken(self) -> bool:
        return False

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    # A file's bytes.

    @abstractmethod
    def write(self, db: Connection, file_id: str, source: IO[bytes]) -> int:
        """Keep ``source`` as the file's content (inside the caller's transaction); its size."""

    @abstractmethod
    def read(self, db: Connection, file_id: str, index: int) -> bytes:
        """The file's ``index``-th chunk of ``CHUNK_BYTES`` (empty past the end)."""

    @abstractmethod
    def remove(self, db: Connection, file_id: str) -> None: ...


class SQLite(Database):
    """SQLite in ``folder``, files beside it: embedded, durable, for one gateway."""

    clock = "(julianday('now') - 2440587.5) * 86400.0"

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / DATABASE).exists()

    def _failures(self) -> tuple[type[Exception], ...]:
        return OSError, sqlite3.OperationalError

    def _unavailable(self, exc: Exception) -> str:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return f"The gateway cannot write its data directory (INFERENCE_DATA_DIR): {reason}."

    def _connect(self) -> Connection:
        (self.folder / "files").mkdir(parents=True, exist_ok=True)
        # Used only on the database's thread, and closed from the loop's once that thread has stopped.
        sqlite = sqlite3.connect(self.folder / DATABASE, isolation_level=None, check_same_thread=False)
        connection = _SQLiteConnection(sqlite)
        connection.execute("PRAGMA journal_mode=WAL")
        for script in self._schemas:
            connection.sqlite.executescript(script.format(rowid=""))  # SQLite numbers rows itself
        return connection

    def close(self) -> None:
        super().close()
        if isinstance(self._connection, _SQLiteConnection):
            self._connection.sqlite.close()

    def _path(self, file_id: str) -> Path:
        return self.folder / "files" / file_id

    def write(self, db: Connection, file_id: str, source: IO[bytes]) -> int:
        partial = self._path(file_id).with_suffix(".partial")
        with partial.open("wb") as target:
            shutil.copyfileobj(source, target, CHUNK_BYTES)
        partial.rename(self._path(file_id))  # whole before it is listed
        return self._path(file_id).stat().st_size

    def read(self, db: Connection, file_id: str, index: int) -> bytes:
        try:
            with self._path(file_id).open("rb") as source:
                source.seek(index * CHUNK_BYTES)
                return source.read(CHUNK_BYTES)
        except FileNotFoundError:
            return b""  # deleted meanwhile: nothing more to read, as in PostgreSQL

    def remove(self, db: Connection, file_id: str) -> None:
        self._path(file_id).unlink(missing_ok=True)


class _SQLiteConnection:
    def __init__(self, sqlite: sqlite3.Connection) -> None:
        self.sqlite = sqlite

    def execute(self, query: str, args: Sequence[object] = ()) -> Rows:
        return self.sqlite.execute(query, args)

    def executemany(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        self.sqlite.executemany(query, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.sqlite.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.sqlite.execute("ROLLBACK")
            raise
        self.sqlite.execute("COMMIT")


_CHUNKS = """
CREATE TABLE IF NOT EXISTS chunks (
    file_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (file_id, n)
);
"""


class Postgres(Database):
    """PostgreSQL at ``url``: batches, lines and file contents shared by every gateway replica."""

    shared = True
    clock = "extract(epoch FROM clock_timestamp())::float8"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._schemas.append(_CHUNKS)

    def _connect(self) -> Connection:
        import psycopg  # only a gateway that uses PostgreSQL loads its driver

        connection = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        rowid = "rowid BIGINT GENERATED ALWAYS AS IDENTITY,"
        try:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(7476697)")  # replicas starting together
                for script in self._schemas:
                    connection.execute(script.format(rowid=rowid))
        except BaseException:
            connection.close()
            raise
        return _PostgresConnection(connection)

    def _failures(self) -> tuple[type[Exception], ...]:
        import psycopg

        return (psycopg.OperationalError,)

    def _unavailable(self, exc: Exception) -> str:
        return "The gateway's database (INFERENCE_DATABASE_URL) cannot be reached; try again shortly."

    def _broken(self) -> bool:
        return isinstance(self._connection, _PostgresConnection) and bool(self._connection.postgres.broken)

    def close(self) -> None:
        super().close()
        if isinstance(self._connection, _PostgresConnection):
            self._connection.postgres.close()

    def write(self, db: Connection, file_id: str, source: IO[bytes]) -> int:
        size = index = 0
        while chunk := source.read(CHUNK_BYTES):
            db.execute("INSERT INTO chunks (file_id, n, data) VALUES (?, ?, ?)", (file_id, index, chunk))
            size, index = size + len(chunk), index + 1
        return size

    def read(self, db: Connection, file_id: str, index: int) -> bytes:
        row = db.execute("SELECT data FROM chunks WHERE file_id = ? AND n = ?", (file_id, index)).fetchone()
        return bytes(row[0]) if row else b""

    def remove(self, db: Connection, file_id: str) -> None:
        db.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))


class _PostgresConnection:
    def __init__(self, postgres: psycopg.Connection[Any]) -> None:
        self.postgres = postgres
        self._queries: dict[str, str] = {}

    def _query(self, query: str) -> str:
        """The query with psycopg's placeholders (no query here holds a literal ``?`` or ``%``)."""
        translated = self._queries.get(query)
        if translated is None:
            translated = self._queries[query] = query.replace("?", "%s")
        return translated

    def execute(self, query: str, args: Sequence[object] = ()) -> Rows:
        return self.postgres.execute(self._query(query), args)

    def executemany(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        with self.postgres.cursor() as cursor:
            cursor.executemany(self._query(query), rows)

    def transaction(self) -> Any:
        return self.postgres.transaction()


def open_database(url: str | None, folder: Path) -> Database:
    """PostgreSQL where ``INFERENCE_DATABASE_URL`` names it, else SQLite in the data directory."""
    return Postgres(url) if url else SQLite(folder)
