"""Which prompt blocks one replica holds in its prefix cache, as its KV events describe it.

vLLM names a block by a hash of its tokens chained to its parent's, seeded in ways the gateway
need not reproduce. The index keys each block by the gateway's own chained hash (``chain``) of
the same tokens, computed from the ``token_ids`` every ``BlockStored`` carries, so a prompt's
blocks can be looked up without knowing vLLM's seed; vLLM's hash maps to the gateway's key for
``BlockRemoved``, which names blocks by vLLM's hash alone. A LoRA adapter's blocks chain from
their own root, as vLLM keeps them apart.

Blocks the gateway has just routed a prompt to are *credited* at once, for ``CREDIT_SECONDS``,
until the replica's events confirm them: a burst of requests sharing a new prefix then lands on
the replica that will hold it, not spread over all of them.

Memory is bounded: at most ``capacity`` blocks per replica (about 200 bytes each), the oldest
stored forgotten first. vLLM's own cache is smaller than that in any sane configuration; the
bound only matters if removals went missing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from inference_core.kvcache.events import BlockHash, BlockRemoved, BlockStored

#: The gateway's key of a block: the chained hash of its tokens.
Key = int
#: How long a credited block counts as held without the replica's confirmation: a prompt waiting
#: its turn for prefill under load is confirmed late, a failed request never.
CREDIT_SECONDS = 30.0


def root(adapter: str | None) -> Key:
    """The chain's start: one per LoRA adapter, another for the base model.

    The same in every process (str hashes are not), so gateways break ties alike; tuples of ints
    hash alike everywhere, so the rest of the chain is the same too.
    """
    if adapter is None:
        return 0
    return int.from_bytes(hashlib.blake2b(adapter.encode(), digest_size=8).digest(), "big")


def link(parent: Key, block: Sequence[int]) -> Key:
    return hash((parent, tuple(block)))


def chain(tokens: Sequence[int], block_size: int, adapter: str | None) -> list[Key]:
    """The key of each full block of ``tokens`` (a partial last block is never cached)."""
    key = root(adapter)
    keys = []
    whole = tuple(tokens)  # slices of a tuple are tuples: half the time of tuple(list slice)
    for start in range(0, len(whole) - block_size + 1, block_size):
        key = hash((key, whole[start : start + block_size]))
        keys.append(key)
    return keys


class Prompt:
    """A request's prompt tokens and model, with its block keys computed once per block size and adapter."""

    def __init__(self, tokens: Sequence[int], model: str | None) -> None:
        self.tokens = tokens
        self.model = model
        self._keys: dict[tuple[int, str | None], list[Key]] = {}

    def keys(self, block_size: int, adapters: set[str]) -> list[Key]:
        """Its blocks' keys at a replica: chained from the adapter's root if its model is one the replica serves."""
        adapter = self.model if self.model in adapters else None
        keys = self._keys.get((block_size, adapter))
        if keys is None:
            keys = self._keys[block_size, adapter] = chain(self.tokens, block_size, adapter)
        return keys


class BlockIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        #: Tokens per block, learnt from the first event (vLLM's --block-size; 128 on CPU).
        self.block_size: int | None = None
        #: LoRA adapters seen in events: a request naming one chains its prompt from the adapter's root.
        self.adapters: set[str] = set()
        #: vLLM's hash -> the gateway's key, oldest stored first.
        self._keys: dict[BlockHash, Key] = {}
        #: The gateway's key -> how many of vLLM's blocks hold it (a block may sit on several media).
        self._held: dict[Key, int] = {}
        #: Credited keys -> until when (monotonic seconds).
        self._credited: dict[Key, float] = {}

    def learn_block_size(self, size: int) -> None:
        """The replica's block size from its ``/metrics`` (``vllm:cache_config_info``), before any event says it."""
        if self.block_size is None and size > 0:
            self.block_size = size

    def __len__(self) -> int:
        return len(self._keys)

    def stored(self, event: BlockStored) -> bool:
        """Add the event's blocks; False if they cannot be placed (a parent never seen, an odd size)."""
        size = event.block_size
        if len(event.token_ids) != size * len(event.block_hashes) or size <= 0:
            return False  # e.g. a hybrid model's partial blocks: not the prompt blocks routed on
        if self.block_size is None:
            self.block_size = size
        elif size != self.block_size:
            return False
        if event.parent_block_hash is None:
            key = root(event.lora_name)
        else:
            parent = self._keys.get(event.parent_block_hash)
            if parent is None:
                return False  # its chain started before the gateway listened: unplaceable
            key = parent
        if event.lora_name is not None:
            self.adapters.add(event.lora_name)
        tokens = event.token_ids
        for number, block_hash in enumerate(event.block_hashes):
            key = link(key, tokens[number * size : (number + 1) * size])
            self._forget(block_hash)  # stored again: now the newest
            self._keys[block_hash] = key
            self._held[key] = self._held.get(key, 0) + 1
            self._credited.pop(key, None)
        while len(self._keys) > self.capacity:
            self._forget(next(iter(self._keys)))
        return True

    def removed(self, event: BlockRemoved) -> None:
        for block_hash in event.block_hashes:
            self._forget(block_hash)

    def clear(self) -> None:
        self._keys.clear()
        self._held.clear()
        self._credited.clear()

    def credit(self, keys: Sequence[Key], now: float | None = None) -> int:
        """Count ``keys`` as held until events confirm them or ``CREDIT_SECONDS`` pass; how many were not held."""
        now = time.monotonic() if now is None else now
        until = now + CREDIT_SECONDS
        held, credited = self._held, self._credited
        fresh = 0
        for key in keys:
            if key not in held:
                credited[key] = until
                fresh += 1
        if len(credited) > self.capacity:
            self._expire(now)
        return fresh

    def prefix(self, keys: Sequence[Key], now: float | None = None) -> int:
        """How many of ``keys``, from the first, this replica holds (or has been credited with)."""
        held, credited = self._held, self._credited
        now = time.monotonic() if now is None else now
        count = 0
        for key in keys:
            if key not in held:
                until = credited.get(key)
                if until is None or until < now:
                    break
            count += 1
        return count

    @property
    def credited(self) -> int:
        return len(self._credited)

    def _forget(self, block_hash: BlockHash) -> None:
        key = self._keys.pop(block_hash, None)
        if key is None:
            return
        left = self._held[key] - 1
        if left:
            self._held[key] = left
        else:
            del self._held[key]

    def _expire(self, now: float) -> None:
        for key in [key for key, until in self._credited.items() if until < now]:
            del self._credited[key]
        while len(self._credited) > self.capacity:
            del self._credited[next(iter(self._credited))]
