"""Logging: one JSON object per line by default (``INFERENCE_LOG_FORMAT=text`` for people).

A log call may pass ``extra={"fields": {...}}``; the fields become keys of the JSON line, or
``key=value`` pairs in text. Request bodies, keys and Authorization headers are never logged:
nothing on the request path passes them here.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson


class JSONFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
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


class LoopFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to a buffered stderr flushed once per event-loop turn, not once per line.

    A request writes one access-log line; a write system call for each was a measurable share
    of a request's CPU. Lines logged outside the loop (start-up, exit, other threads) are
    flushed at once.
    """

    _pending = False

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if not self._pending:
            self._pending = True
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._pending = False
        super().flush()


def configure_logging(level: str, format: str = "json") -> None:
    """Send every logger (uvicorn's included) through one handler on stderr."""
    # No formatter here prints the caller's file and line, so do not look them up for every record
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False)  # noqa: SIM115
    handler = LoopFlushedHandler(stream)
    handler.setFormatter(JSONFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
