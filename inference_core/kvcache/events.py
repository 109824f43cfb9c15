"""vLLM's KV-cache events as they travel over ZMQ: the wire schema, decoded and encoded.

A vLLM started with ``--kv-events-config`` publishes multipart messages ``(topic, seq, payload)``
on a PUB socket: ``seq`` an 8-byte big-endian counter that starts at 0 with each process, the
payload msgpack of an array ``[ts, events, data_parallel_rank]``, each event a map tagged by
``type``. Its replay socket (ROUTER) answers ``[b"", start_seq]`` with the buffered messages from
``start_seq`` on, then an empty topic with ``END_SEQ``. The structs below mirror vLLM 0.32's
(``vllm/distributed/kv_events.py``): fields this gateway does not read are left out (msgspec
skips unknown map keys), and an event type it does not know is skipped alone, not the batch.
The simulator encodes with the same structs, so it speaks exactly what the gateway reads.
"""

from __future__ import annotations

import msgspec

#: The ``seq`` frame that ends a replay.
END_SEQ = b"\xff" * 8
#: vLLM's block hashes: SHA-256 bytes by default, 64-bit integers with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES.
BlockHash = bytes | int


class BlockStored(msgspec.Struct, tag=True):
    """Blocks a replica now holds: ``token_ids`` are theirs, ``block_size`` tokens each, in order.

    Defaults let older vLLMs' events decode; every field is written, as vLLM requires them.
    """

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    #: Per block: ``None``, or what else went into its hash (the LoRA name first).
    extra_keys: list[list[object] | None] | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    """Blocks a replica evicted."""

    block_hashes: list[BlockHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    """The replica emptied its prefix cache (``/reset_prefix_cache``)."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    """One engine step's events; ``events`` stay raw until each is decoded on its own."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_batch = msgspec.msgpack.Decoder(EventBatch)
_event = msgspec.msgpack.Decoder(Event)
_encoder = msgspec.msgpack.Encoder()


def decode(payload: bytes) -> list[Event]:
    """The events of one message; ``ValueError`` if the payload is not a batch at all."""
    try:
        batch = _batch.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a KV event batch: {exc}") from None
    events: list[Event] = []
    for raw in batch.events:
        try:
            events.append(_event.decode(raw))
        except msgspec.DecodeError:
            continue  # an event type (or shape) from a newer vLLM: the rest of the batch still counts
    return events


def encode(events: list[Event], ts: float, data_parallel_rank: int = 0) -> bytes:
    """A batch as vLLM writes it (the simulator publishes with this)."""
    raw = [msgspec.Raw(_encoder.encode(event)) for event in events]
    return _encoder.encode(EventBatch(ts, raw, data_parallel_rank))


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def seq_of(frame: bytes) -> int:
    return int.from_bytes(frame, "big")
