"""Health: a background probe of the backend, readiness, and the graceful drain on SIGTERM.

Probes run on their own schedule (``INFERENCE_PROBE_INTERVAL``), so ``/health`` and
``/health/ready`` answer from memory and a Kubernetes probe storm never reaches the backend.
On SIGTERM the gateway stops admitting work (503 ``draining``), turns unready at once, lets
what is in flight finish for up to ``INFERENCE_SHUTDOWN_GRACE`` seconds, then hands the signal
on to the server, which exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from typing import Any

import orjson

from inference_core.engine import Engine, Probe
from inference_core.errors import GatewayError
from inference_core.observability import Metrics

log = logging.getLogger("inference_core")
#: A probe older than this many intervals no longer counts as proof of life.
STALE_AFTER_INTERVALS = 3


class HealthMonitor:
    def __init__(self, engine: Engine, metrics: Metrics, *, interval: float, shutdown_grace: float) -> None:
        self.engine = engine
        self.metrics = metrics
        self.interval = interval
        self.shutdown_grace = shutdown_grace
        self.last: Probe | None = None
        self.last_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # Probing.

    async def probe_once(self) -> None:
        await self.engine.discover()
        self.last = probe = await self.engine.probe()
        self.last_at = time.monotonic()
        self.metrics.backend_up.set(1 if probe.ok else 0)
        self.metrics.probe_latency.set(probe.latency_ms / 1000)
        if probe.ok:
            with contextlib.suppress(GatewayError, ValueError, TypeError, KeyError):
                listed = orjson.loads(await self.engine.models("health-probe"))["data"]
                self.metrics.learn_models(entry["id"] for entry in listed if isinstance(entry.get("id"), str))

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_once()
            except Exception:
                log.exception("health probe failed")
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        await self.probe_once()
        self._task = asyncio.create_task(self._run())
        self._watch_sigterm()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def backend_alive(self) -> bool:
        fresh = time.monotonic() - self.last_at <= STALE_AFTER_INTERVALS * self.interval
        return self.last is not None and self.last.ok and fresh

    @property
    def draining(self) -> bool:
        return self.engine.admission.closed

    def ready(self) -> tuple[bool, str]:
        admission = self.engine.admission
        if self.draining:
            return False, "draining"
        if not self.backend_alive():
            return False, "backend unreachable"
        if admission.waiting >= admission.queue_size:
            return False, "queue full"
        return True, "ready"

    def report(self) -> dict[str, Any]:
        admission = self.engine.admission
        provider = self.engine.provider
        ok, reason = self.ready()
        return {
            "status": "ok" if ok else ("draining" if self.draining else "degraded"),
            "reason": reason,
            "provider": provider.name,
            "model": self.engine.default_model,
            "backend": {
                "reachable": self.last.ok if self.last else None,
                "latency_ms": round(self.last.latency_ms, 2) if self.last else None,
                "last_probe_age_s": round(time.monotonic() - self.last_at, 2) if self.last else None,
                "version": provider.version,
            },
            "queue": {"depth": admission.waiting, "capacity": admission.queue_size},
            "in_flight": admission.in_flight,
            "concurrency_limit": admission.max_in_flight,
        }

    # Draining.

    def _watch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread: an embedding server handles them
        previous = signal.getsignal(signal.SIGTERM)
        loop = asyncio.get_running_loop()

        async def drain_then_pass_on() -> None:
            await self.drain()
            # Hand the signal to whoever had it before us (uvicorn's graceful exit).
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)

        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(drain_then_pass_on()))

    async def drain(self) -> None:
        """Refuse new work, and wait (at most the grace period) for the work in flight."""
        admission = self.engine.admission
        admission.close()
        log.info("draining", extra={"fields": {"in_flight": admission.in_flight, "queued": admission.waiting}})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.shutdown_grace):
                await admission.idle()
        log.info("drained", extra={"fields": {"in_flight": admission.in_flight, "queued": admission.waiting}})
