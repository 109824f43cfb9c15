"""One replica's KV-event feed: its ZMQ sockets, sequence and reconnects, and the index they fill.

Each gateway subscribes to every replica itself (PUB/SUB fans out), so gateways share no index
and still agree: they all hear the same events.

What the feed trusts, and when it stops:

- Messages are numbered. A gap (a message lost to the socket's high-water mark) is filled from
  the replica's replay socket; if that fails, the replica's entries are dropped rather than
  trusted. ``seq`` going back means the replica restarted (a new process numbers from 0 and
  sends no ``AllBlocksCleared``): the index is cleared. So is it when the connection drops,
  when a health probe fails, or on ``AllBlocksCleared``.
- On the first message after connecting, what the replica buffered before it is replayed, so a
  gateway started after its replicas still learns what they hold.
- ``trusted`` is false while not connected, and when prompts were routed here ``silence``
  seconds ago and no event has come since (a publisher that stopped): the replica is then routed
  by load alone, until events flow again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from inference_core.kvcache import events
from inference_core.kvcache.index import BlockIndex, Key, Prompt

log = logging.getLogger("inference_core")
#: How long a replay may take to answer each message before it counts as failed.
REPLAY_TIMEOUT_SECONDS = 2.0
#: ZMQ heartbeats: a replica gone without closing its connection is noticed within the timeout.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 6_000
RETRY_SECONDS = 1.0


class Feed:
    def __init__(
        self,
        context: zmq.asyncio.Context,
        *,
        endpoint: str,
        replay: str | None,
        capacity: int,
        silence: float,
        fields: dict[str, str],
    ) -> None:
        self.context = context
        self.endpoint = endpoint
        self.replay_endpoint = replay
        self.silence = silence
        #: The backend and replica, for log lines (never an address that could carry credentials).
        self.fields = fields
        self.index = BlockIndex(capacity)
        #: Events applied, by vLLM's type name.
        self.counts: Counter[str] = Counter()
        self.connected = False
        self.last_seq: int | None = None
        self.last_event_at: float | None = None
        #: When a prompt was first routed here with no event heard since (None: none pending).
        self._awaiting: float | None = None
        self._down_reason: str | None = "not connected"
        #: Messages up to ``last_seq`` were replayed on connecting: the same seen again are not a restart.
        self._replayed = False
        self._unreachable_logged = False
        self._task: asyncio.Task[None] | None = None

    # What routing reads.

    @property
    def trusted(self) -> bool:
        if not self.connected:
            return False
        awaiting = self._awaiting
        return awaiting is None or time.monotonic() - awaiting < self.silence

    def held(self, prompt: Prompt) -> tuple[int, list[Key]]:
        """How many of ``prompt``'s blocks this replica holds from the first (0 while untrusted), and their keys."""
        size = self.index.block_size
        if size is None:
            return 0, []  # no event yet: nothing held, and the block size is not known
        keys = prompt.keys(size, self.index.adapters)
        return (self.index.prefix(keys) if self._check_trusted() else 0), keys

    def routed(self, prompt: Prompt) -> int:
        """A request with ``prompt`` goes here: credit its blocks, expect events; returns the blocks it held."""
        held, keys = self.held(prompt)
        if self.index.credit(keys) and self._awaiting is None:
            self._awaiting = time.monotonic()  # new blocks: the replica will report storing them
        return held

    def report(self) -> dict[str, object]:
        return {
            "events": "up" if self.trusted else "down",
            "blocks": len(self.index),
            "credited_blocks": self.index.credited,
            "block_size": self.index.block_size,
            "last_seq": self.last_seq,
            "last_event_age_s": None if self.last_event_at is None else round(time.monotonic() - self.last_event_at, 2),
        }

    def forget(self, reason: str) -> None:
        """Drop what the index says (a failed probe, a restart, a gap not filled)."""
        if len(self.index) or self.index.credited:
            log.info("kv index cleared", extra={"fields": {**self.fields, "reason": reason}})
        self.index.clear()
        self._awaiting = None

    # The task.

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken subscription: start over, routed by load meanwhile
                self._lost(f"subscription failed: {exc.__class__.__name__}")
                await asyncio.sleep(RETRY_SECONDS)

    async def _listen(self) -> None:
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5_000)
        monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        poller = zmq.asyncio.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            socket.connect(self.endpoint)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())["event"]
                    if event == zmq.EVENT_CONNECTED:
                        self.connected = True
                        self._unreachable_logged = False
                        await self._caught_up()
                    elif event == zmq.EVENT_DISCONNECTED:
                        self._lost("disconnected")
                    elif not self._unreachable_logged:  # retried: logged once until it connects
                        log.warning("kv events unreachable; retrying", extra={"fields": self.fields})
                        self._unreachable_logged = True
                if socket in ready:
                    await self._received(await socket.recv_multipart())
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            self.connected = False

    async def _caught_up(self) -> None:
        """Just connected: replay what the replica buffered, so an idle replica's cache is known too."""
        self._replayed = await self._replay(0, None, exact=False) is not None

    async def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.counts["malformed"] += 1
            return
        seq = events.seq_of(frames[1])
        last = self.last_seq
        if last is not None and seq <= last and self._replayed:
            return  # published while the replay on connecting was under way: applied already
        self._replayed = False
        if last is None or seq <= last:
            if last is not None:
                self.forget("replica restarted")
            if seq > 0:
                await self._replay(0, seq, exact=False)  # what it held before this gateway listened
        elif seq > last + 1 and await self._replay(last + 1, seq, exact=True) != seq:
            self.forget("events lost")
        self._apply(seq, frames[2])

    async def _replay(self, start: int, stop: int | None, *, exact: bool) -> int | None:
        """Apply the replica's buffered messages from ``start`` up to ``stop`` (exclusive; None: all).

        Returns the sequence number after the last one applied, or None if the replay failed or
        missed one. Without ``exact``, a buffer that no longer reaches back to ``start`` is applied
        from where it begins.
        """
        if self.replay_endpoint is None:
            return None
        dealer = self.context.socket(zmq.DEALER)
        expected = start
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart((b"", events.seq_bytes(start)))
            while True:
                if not await dealer.poll(REPLAY_TIMEOUT_SECONDS * 1000):
                    return None
                frames = await dealer.recv_multipart()
                if len(frames) != 4:
                    return None
                _, _, seq_frame, payload = frames
                if seq_frame == events.END_SEQ:
                    return expected if stop is None or expected >= stop else None
                seq = events.seq_of(seq_frame)
                if seq < expected or (stop is not None and seq >= stop):
                    continue
                if seq > expected and (exact or expected > start):
                    return None  # a hole in the replay itself
                self._apply(seq, payload)
                expected = seq + 1
        finally:
            dealer.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        try:
            batch = events.decode(payload)
        except ValueError:
            self.counts["malformed"] += 1
            return
        index = self.index
        for event in batch:
            if isinstance(event, events.BlockStored):
                index.stored(event)
            elif isinstance(event, events.BlockRemoved):
                index.removed(event)
            else:
                self.forget("AllBlocksCleared")
            self.counts[type(event).__name__] += 1
        self.last_event_at = time.monotonic()
        self._awaiting = None

    def _check_trusted(self) -> bool:
        """``trusted``, logging each change of it once."""
        trusted = self.trusted
        reason = None if trusted else ("not connected" if not self.connected else "no events")
        if reason != self._down_reason:
            if reason is None:
                log.info("kv events up", extra={"fields": self.fields})
            else:
                log.warning("kv events down; routed by load", extra={"fields": {**self.fields, "reason": reason}})
            self._down_reason = reason
        return trusted

    def _lost(self, reason: str) -> None:
        self.connected = False
        self.last_seq = None
        self.forget(reason)
