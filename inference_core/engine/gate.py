"""The key gate: a call's key checked and its limits taken before the call starts, given back after.

A call under a limited key reserves its request and tokens in the key's window and, with
``max_concurrent``, waits for one of the key's slots; the ``Ticket`` it gets says what to give
back. When the call ends, the slot is returned and the reservation corrected by the tokens the
answer really used (a stream without usage: its prompt as estimated, and one token per event).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from inference_core.engine.call import Call, Outcome
from inference_core.engine.tenants import Quota, Slot, SlotStore, Tenant, WindowStore, estimate
from inference_core.errors import QueueTimeout


@dataclass(frozen=True, slots=True)
class Ticket:
    """A call admitted under its key's limits: what it reserved and holds, given back when it ends."""

    tenant: Tenant
    quota: Quota | None
    window: int
    #: Tokens reserved under the key's tpm (0: it has none), and the prompt's share of them.
    reserved: int
    prompt: int
    #: The key's concurrency slot it holds (None: the key has no max_concurrent).
    slot: Slot | None

    def headers(self) -> dict[str, str]:
        return self.quota.headers() if self.quota is not None else {}


class KeyGate:
    def __init__(
        self, windows: WindowStore, slots: SlotStore, *, queue_timeout: float, default_completion_tokens: int
    ) -> None:
        self.windows = windows
        self.slots = slots
        self.queue_timeout = queue_timeout
        self.default_completion_tokens = default_completion_tokens

    async def enter(self, call: Call, model: str) -> Ticket | None:
        """Check the call's key for ``model`` and take what its limits allow (403, 429 or 503 if not)."""
        tenant = call.tenant
        if tenant is None:
            return None
        if call.endpoint.body:
            tenant.check_model(model)
        if not tenant.limited:
            return None
        config = tenant.config
        prompt, completion = estimate(call.raw, call.payload, self.default_completion_tokens)
        reserved = prompt + completion if config.tpm else 0
        quota, window = await self.windows.take(tenant, reserved) if config.rpm or config.tpm else (None, 0)
        slot = None
        if config.max_concurrent:
            started = time.monotonic()
            try:
                slot = await self.slots.acquire(tenant, within=self.queue_timeout)
            finally:
                call.outcome.queued += time.monotonic() - started
                if slot is None and reserved:
                    self.windows.settle(tenant, window, -reserved)
            if slot is None:
                raise QueueTimeout(
                    f"The request waited over {self.queue_timeout:g}s for one of its key's "
                    f"{config.max_concurrent} slots."
                )
        tenant.active += 1
        return Ticket(tenant, quota, window, reserved, prompt, slot)

    def leave(self, ticket: Ticket, outcome: Outcome) -> None:
        tenant = ticket.tenant
        tenant.active -= 1
        if ticket.slot is not None:
            self.slots.release(tenant, ticket.slot)
        if ticket.reserved:
            if outcome.prompt_tokens is not None:
                used = outcome.prompt_tokens + (outcome.completion_tokens or 0)
            else:  # a stream without usage: the prompt as estimated, and one token per event
                used = ticket.prompt + outcome.events
            self.windows.settle(tenant, ticket.window, used - ticket.reserved)

    @staticmethod
    async def counted(frames: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
        """Relay ``frames``, counting them (the usage of a stream that reports none)."""
        async for frame in frames:
            outcome.events += 1
            yield frame
