"""SIGHUP: read the configuration file again, and route new requests by it.

Handled inside the app (as the SIGTERM drain is), so it works under ``uvicorn
inference_core.api:app`` as under ``inference-core``. Backends whose block did not change are
kept as they are (connections, health, counters); new ones are started and probed before the
first request reaches them; removed ones finish what they have in flight and are then closed.
Requests keep the fleet they started with. A file that does not load changes nothing: the
problem is logged and the old configuration stays in force. Top-level settings (queue size,
keys, logging...) are read at start-up only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

from inference_core.config import ConfigError
from inference_core.config_file import FleetConfig
from inference_core.engine import Backend, Engine, Fleet
from inference_core.health import HealthMonitor

log = logging.getLogger("inference_core")


class Reloader:
    def __init__(
        self,
        engine: Engine,
        health: HealthMonitor,
        *,
        load: Callable[[], FleetConfig],
        build: Callable[[FleetConfig, Fleet | None], Fleet],
    ) -> None:
        self.engine = engine
        self.health = health
        self.load = load
        self.build = build
        self._retiring: dict[Backend, asyncio.Task[None]] = {}

    def watch(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    async def reload(self) -> bool:
        """Swap in the file's fleet; False (and a log line) if the file does not load."""
        old = self.engine.fleet
        try:
            fleet = self.build(self.load(), old)
        except ConfigError as exc:
            log.error("configuration not reloaded", extra={"fields": {"reason": str(exc)}})
            return False
        kept = set(old.backends.values())
        fresh = [backend for backend in fleet.backends.values() if backend not in kept]
        for backend in fresh:
            await backend.start()
        await asyncio.gather(*(self.health.probe_backend(backend) for backend in fresh))
        self.engine.fleet = fleet
        for backend in kept - set(fleet.backends.values()):
            self._retiring[backend] = asyncio.create_task(self._retire(backend))
        fields = {"backends": list(fleet.backends), "aliases": list(fleet.aliases)}
        log.info("configuration reloaded", extra={"fields": fields})
        return True

    async def _retire(self, backend: Backend) -> None:
        """Close a removed backend once no call is using it."""
        await backend.unused()
        await backend.aclose()
        self._retiring.pop(backend, None)

    async def stop(self) -> None:
        for backend, task in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await backend.aclose()
