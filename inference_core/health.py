"""Health: a background probe of every backend, readiness, and the graceful drain on SIGTERM.

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
from collections.abc import Callable
from typing import Any

from inference_core.config import LBPolicy
from inference_core.engine import Backend, Engine
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
        #: The batches the gateway is running (id -> status), for the report.
        self.batches: Callable[[], dict[str, str]] = dict

    # Probing.

    async def probe_once(self) -> None:
        """Probe every replica of every backend at once."""
        fleet = self.engine.fleet
        await asyncio.gather(*(self.probe_backend(backend) for backend in fleet.backends.values()))
        self.metrics.learn_models(fleet.aliases)  # an alias is a model name clients use: a label too
        self.last_at = time.monotonic()

    async def probe_backend(self, backend: Backend) -> None:
        """Probe a backend's replicas; learn their versions and, for load_aware and cache_aware, their load."""
        balancer = backend.balancer
        probes = await asyncio.gather(*(backend.probe(replica) for replica in backend.replicas))
        for replica, (ok, latency_ms) in zip(backend.replicas, probes, strict=True):
            replica.probed(ok, latency_ms)
            if ok:
                replica.succeeded()
                await backend.discover(replica)
                self.metrics.learn_models(replica.models or ())
            else:
                if replica.kv is not None:
                    replica.kv.forget("probe failed")  # a replica that comes back may have restarted empty
                if replica.failed(eject_after=balancer.eject_after):
                    fields = {"backend": backend.name, "replica": replica.name, "address": replica.address}
                    log.warning("replica ejected", extra={"fields": fields})
        if balancer.policy in (LBPolicy.LOAD_AWARE, LBPolicy.CACHE_AWARE):
            await asyncio.gather(*(backend.scrape_load(r) for r in backend.replicas if r.healthy))

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
        """At least one replica of some backend is in rotation and answered its latest probe, recently."""
        stale = STALE_AFTER_INTERVALS * self.interval
        now = time.monotonic()
        return any(
            replica.healthy and replica.probe_ok and now - replica.probed_at <= stale
            for backend in self.engine.fleet.backends.values()
            for replica in backend.replicas
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
        """The gateway's state; ``provider``, ``backend`` and ``replicas`` describe the first backend."""
        admission = self.engine.admission
        fleet = self.engine.fleet
        first = next(iter(fleet.backends.values()))
        versions = [replica.provider.version for replica in first.replicas if replica.provider.version]
        ok, reason = self.ready()
        return {
            "status": "ok" if ok else ("draining" if self.draining else "degraded"),
            "reason": reason,
            "provider": first.kind.value,
            "model": fleet.default_model,
            "backend": {
                "reachable": any(replica.probe_ok for replica in first.replicas),
                "healthy_replicas": sum(replica.healthy for replica in first.replicas),
                "version": versions[0] if versions else None,
            },
            "replicas": [replica.report() for replica in first.replicas],
            "backends": [backend.report() for backend in fleet.backends.values()],
            "aliases": {alias: [f"{t.backend}/{t.model}" for t in chain] for alias, chain in fleet.aliases.items()},
            "queue": {"depth": admission.waiting, "capacity": admission.queue_size},
            "in_flight": admission.in_flight,
            "concurrency_limit": admission.max_in_flight,
            "batches": {"running": len(self.batches())},
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
