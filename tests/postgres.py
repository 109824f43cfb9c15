"""A real PostgreSQL server for the tests: its own cluster in a temporary folder, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.servers import free_port


class PostgreSQL:
    """``initdb`` + ``postgres`` as an unprivileged user (PostgreSQL refuses to run as root), no fsync."""

    def __init__(self) -> None:
        if not (shutil.which("initdb") and shutil.which("pg_ctl")):
            pytest.skip("PostgreSQL's initdb and pg_ctl are not on PATH")
        # Not under pytest's folders: they are private to root, and the server runs as another user.
        self.folder = Path(tempfile.mkdtemp(prefix="inference-core-pg-"))
        self.port = free_port()
        self._databases = 0
        if os.geteuid() == 0:
            shutil.chown(self.folder, "nobody")

    def _as_owner(self, *command: str) -> None:
        prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        data = str(self.folder / "data")
        self._as_owner("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_owner("pg_ctl", "-D", data, "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def restart(self) -> None:
        """Stopped (every connection dropped) and started again, with the same options."""
        data, log = str(self.folder / "data"), str(self.folder / "log")
        self._as_owner("pg_ctl", "-D", data, "-l", log, "-m", "fast", "-w", "restart")

    def database(self) -> str:
        """A new, empty database: its URL."""
        self._databases += 1
        name = f"gateway_{self._databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # never started
            self._as_owner("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
