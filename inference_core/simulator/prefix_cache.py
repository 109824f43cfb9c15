"""A vLLM replica's prefix cache as the simulator models it: which prompt blocks it holds, what it reports.

vLLM caches a prompt by blocks of ``block_size`` tokens (16 on GPU) and names each full block by
a SHA-256 hash chained over its parent's hash, its tokens and its extra keys (the request's LoRA
adapter): ``sha256(pickle((parent, tokens, extra_keys)))``, the first block's parent being
``sha256(pickle(seed))`` with vLLM's fixed seed (pickle only writes here, nothing is unpickled).
The same tokens therefore get the same names from every simulator, as from every vLLM started
without ``PYTHONHASHSEED``, and the very names such a vLLM would give them.

``admit`` mirrors vLLM's scheduler admitting a request:

- the hit is the longest run of held blocks from the first, short of the prompt's last token
  (vLLM recomputes that token for its logits, so a wholly cached prompt recomputes its last block);
- hit blocks are referenced, so they cannot be evicted while the request runs;
- the prompt's remaining full blocks are stored; when the cache is full, unreferenced blocks are
  evicted, least recently released first; blocks that find no room are not cached;
- the events come in vLLM's order: one ``BlockRemoved`` per evicted block (vLLM evicts as it
  allocates), then a ``BlockStored`` for the run of newly stored blocks.

``release`` hands a finished request's blocks back, the last first, so a prompt's tail is evicted
before its head, as vLLM frees them. Hit and query counts are in tokens, as vLLM's metrics are.

Not modelled, so a real replica of the same size evicts somewhat sooner: the partial last block
and the blocks of generated tokens (vLLM allocates both, and caches the latter). A block already
held is never stored twice (vLLM may recompute the last block of a wholly cached prompt into a
second copy, and report it).
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from inference_core.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, Event

#: vLLM's block size on GPU.
DEFAULT_BLOCK_SIZE = 16
#: The seed of vLLM's first parent hash when ``PYTHONHASHSEED`` is unset (``DEFAULT_NONE_HASH_SEED``).
VLLM_SEED = "vllm-none-hash"
#: Where the blocks live, as the events say.
MEDIUM = "GPU"


def _sha256(value: object) -> bytes:
    """vLLM's default ``sha256`` hash function: SHA-256 of the value's pickle."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


@dataclass(frozen=True, slots=True)
class Adapter:
    """A LoRA adapter as vLLM keys its blocks: its name and path go into every block's hash."""

    name: str
    #: vLLM's ``lora_int_id``: 1 for the first adapter loaded.
    id: int
    path: str

    def extra_keys(self) -> tuple[tuple[str, str, str], ...]:
        return (("lora", self.name, self.path),)


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting one request did: its cache hit, the events to publish, the blocks it holds."""

    #: Leading prompt tokens served from the cache (whole blocks).
    cached_tokens: int
    events: list[Event]
    #: The blocks the request references until ``release``, first to last.
    held: tuple[bytes, ...]
    #: The cache's epoch at admission: a reset since makes ``release`` a no-op.
    epoch: int


class PrefixCache:
    """``capacity`` blocks of ``block_size`` tokens, hashed and evicted as vLLM does."""

    def __init__(self, capacity: int, *, block_size: int = DEFAULT_BLOCK_SIZE, seed: str = VLLM_SEED) -> None:
        if capacity < 1 or block_size < 1:
            raise ValueError("capacity and block_size must be positive")
        self.capacity = capacity
        self.block_size = block_size
        self._root = _sha256(seed)
        #: Every cached block -> how many running requests reference it.
        self._refs: dict[bytes, int] = {}
        #: The unreferenced blocks, least recently released first: the eviction order.
        self._free: OrderedDict[bytes, None] = OrderedDict()
        self._epoch = 0
        #: Prompt tokens looked up, and those found (vLLM's prefix_cache_queries and _hits).
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def in_use(self) -> int:
        """Blocks referenced by running requests."""
        return len(self._refs) - len(self._free)

    def hashes(self, tokens: Sequence[int], adapter: Adapter | None = None) -> list[bytes]:
        """The hash of each full block of ``tokens``, as vLLM computes it."""
        extra_keys = adapter.extra_keys() if adapter is not None else None
        size = self.block_size
        parent = self._root
        hashes = []
        for start in range(0, len(tokens) - size + 1, size):
            parent = _sha256((parent, tuple(tokens[start : start + size]), extra_keys))
            hashes.append(parent)
        return hashes

    def admit(self, tokens: Sequence[int], adapter: Adapter | None = None) -> Admission:
        """Look the prompt up, reference its hit, store its other full blocks; see the module docstring."""
        hashes = self.hashes(tokens, adapter)
        size = self.block_size
        hittable = min(len(hashes), (len(tokens) - 1) // size)
        hit = 0
        while hit < hittable and hashes[hit] in self._refs:
            hit += 1
        self.queries += len(tokens)
        self.hits += hit * size
        # Reference what is held before making room, so that room is not made by evicting it.
        present = [block in self._refs for block in hashes]
        for block, found in zip(hashes, present, strict=True):
            if found:
                self._reference(block)
        missing = [index for index, found in enumerate(present) if not found][: self.capacity - self.in_use]
        events: list[Event] = []
        for _ in range(len(self._refs) + len(missing) - self.capacity):
            evicted, _ = self._free.popitem(last=False)
            del self._refs[evicted]
            events.append(BlockRemoved([evicted], medium=MEDIUM))
        for index in missing:
            self._refs[hashes[index]] = 1
        events.extend(self._stored(tokens, hashes, missing, adapter))
        stored = set(missing)
        held = tuple(block for index, block in enumerate(hashes) if present[index] or index in stored)
        return Admission(hit * size, events, held, self._epoch)

    def release(self, admission: Admission) -> None:
        """The request finished: its blocks become evictable, its last block first."""
        if admission.epoch != self._epoch:
            return
        for block in reversed(admission.held):
            refs = self._refs[block] - 1
            self._refs[block] = refs
            if refs == 0:
                self._free[block] = None

    def reset(self, *, force: bool = False) -> list[Event] | None:
        """Forget every block, as ``/reset_prefix_cache``; None (nothing done) while requests hold blocks.

        ``force`` resets anyway (vLLM's ``reset_running_requests``): running requests keep going,
        their blocks gone.
        """
        if self.in_use and not force:
            return None
        self._refs.clear()
        self._free.clear()
        self._epoch += 1
        return [AllBlocksCleared()]

    def _reference(self, block: bytes) -> None:
        self._refs[block] += 1
        self._free.pop(block, None)

    def _stored(
        self, tokens: Sequence[int], hashes: list[bytes], indices: list[int], adapter: Adapter | None
    ) -> list[Event]:
        """One ``BlockStored`` per run of consecutive stored blocks, each naming its parent."""
        events: list[Event] = []
        size = self.block_size
        runs: list[list[int]] = []
        for index in indices:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            first, last = run[0], run[-1]
            events.append(
                BlockStored(
                    block_hashes=[hashes[index] for index in run],
                    parent_block_hash=hashes[first - 1] if first else None,
                    token_ids=list(tokens[first * size : (last + 1) * size]),
                    block_size=size,
                    lora_id=adapter.id if adapter is not None else None,
                    medium=MEDIUM,
                    lora_name=adapter.name if adapter is not None else None,
                    extra_keys=[[adapter.name] if adapter is not None else None for _ in run],
                )
            )
        return events
