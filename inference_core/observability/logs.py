"""Logging: one JSON object per line by default (``INFERENCE_LOG_FORMAT=text`` for people).

A log call may pass ``extra={"fields": {...}}``; the fields become keys of the JSON line, or
``key=value`` pairs in text. Request bodies, keys and Authorization headers are never logged:
nothing on the request path passes them here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import orjson


class JSONFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        fields = getattr(record, "fields", {})
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(), fields, exception)

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        message: str,
        fields: dict[str, Any],
        exception: str | None = None,
    ) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line: dict[str, Any] = {
            "ts": f"{self._stamp}.{int((created - second) * 1000):03d}Z",
            "level": level,
            "logger": logger,
            "message": message,
        }
        line.update(fields)
        if exception:
            line["exception"] = exception
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        return text


class LoopFlushedHandler(logging.Handler):
    """Collects whole lines and writes them to ``fd`` every ``FLUSH_SECONDS``, not once per line.

    Each request writes an access-log line; a write system call for each was a measurable
    share of a request's CPU. Each write holds whole lines only, so a reader of the file or
    pipe never sees half a line. Lines logged outside the event loop (start-up, exit, other
    threads) are written at once.
    """

    FLUSH_SECONDS = 0.05

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self._lines: list[str] = []
        self._pending = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)

    def write(self, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._pending:
            self._pending = True
            loop.call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines, self._pending = self._lines, [], False
        if lines:
            data = memoryview(("\n".join(lines) + "\n").encode())
            while data:
                data = data[os.write(self.fd, data) :]


access_log = logging.getLogger("inference_core.access")
UVICORN_ACCESS = "uvicorn.access"
#: Where JSON access lines go directly, once ``configure_logging`` has set up the JSON format.
_json_sink: LoopFlushedHandler | None = None


def log_access(fields: dict[str, Any]) -> None:
    """One access-log line (logger ``inference_core.access``, level INFO).

    In the JSON format it is written straight to the handler: for a line a request, building a
    ``LogRecord`` and walking the handler chain cost more than formatting the line itself.
    """
    sink = _json_sink
    if sink is None:
        access_log.info("request", extra={"fields": fields})
    elif access_log.isEnabledFor(logging.INFO):
        formatter = sink.formatter
        assert isinstance(formatter, JSONFormatter)
        sink.write(formatter.line(time.time(), "info", access_log.name, "request", fields))


def configure_logging(level: str, format: str = "json") -> None:
    """Send every logger through one handler on stderr; the gateway writes the only access line.

    uvicorn's access logger is left with no handler and no parent to reach, so uvicorn neither
    writes its own line beside the gateway's nor spends time formatting one (it checks
    ``hasHandlers()`` once per connection).
    """
    # No formatter here prints the caller's file and line, so do not look them up for every record
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    handler = LoopFlushedHandler(sys.stderr.fileno())
    handler.setFormatter(JSONFormatter() if format == "json" else TextFormatter())
    global _json_sink
    _json_sink = handler if format == "json" else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    uvicorn_access = logging.getLogger(UVICORN_ACCESS)
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False


def server_logs_access() -> bool:
    """Whether the server running the app was left to log access (uvicorn's ``--no-access-log``, say, turns it off).

    uvicorn and gunicorn's uvicorn workers say so the same way: their access logger can reach a
    handler. Read it before ``configure_logging`` replaces that logger's handlers.
    """
    return logging.getLogger(UVICORN_ACCESS).hasHandlers()
