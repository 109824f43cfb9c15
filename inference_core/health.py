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

from inference_core.config import LBPolicy
from inference_core.engine import Engine
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
        self.last_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # Probing.

    async def probe_once(self) -> None:
        """Probe every replica at once; learn the backend's version and, for load_aware, its load."""
        balancer = self.engine.balancer
        probes = await asyncio.gather(*(self.engine.probe(replica) for replica in balancer.replicas))
        for replica, probe in zip(balancer.replicas, probes, strict=True):
            replica.probed(probe.ok, probe.latency_ms)
            if probe.ok:
                replica.succeeded()
                await self.engine.discover(replica)
                self.metrics.learn_models(replica.models or ())
            elif replica.failed(eject_after=balancer.eject_after):
                log.warning("replica ejected", extra={"fields": {"replica": replica.name, "address": replica.address}})
        if balancer.policy is LBPolicy.LOAD_AWARE:
            await asyncio.gather(*(self.engine.scrape_load(r) for r in balancer.replicas if r.healthy))
        self.last_at = time.monotonic()

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
        """At least one replica is in rotation and answered its latest probe, recently."""
        stale = STALE_AFTER_INTERVALS * self.interval
        now = time.monotonic()
        return any(
            replica.healthy and replica.probe_ok and now - replica.probed_at <= stale
            for replica in self.engine.balancer.replicas
        )

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
        replicas = self.engine.balancer.replicas
        ok, reason = self.ready()
        return {
            "status": "ok" if ok else ("draining" if self.draining else "degraded"),
            "reason": reason,
            "provider": provider.name,
            "model": self.engine.default_model,
            "backend": {
                "reachable": any(replica.probe_ok for replica in replicas),
                "healthy_replicas": sum(replica.healthy for replica in replicas),
                "version": provider.version,
            },
            "replicas": [replica.report() for replica in replicas],
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
