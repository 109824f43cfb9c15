"""The KV index and cache_aware's decision, without sockets: events in, blocks held and replicas chosen out."""

from __future__ import annotations

import time

import msgspec
import zmq.asyncio

from inference_core.config import LBPolicy
from inference_core.engine.replicas import Balancer, Load, Replica, cache_score
from inference_core.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, decode, encode
from inference_core.kvcache.feed import Feed
from inference_core.kvcache.index import CREDIT_SECONDS, BlockIndex, Prompt, chain
from inference_core.providers.vllm import VLLMProvider
from inference_core.upstream import create_transport

SIZE = 4


def stored(tokens: list[int], hashes: list[bytes], parent: bytes | None = None, lora: str | None = None) -> BlockStored:
    return BlockStored(hashes, parent, tokens, SIZE, None, "GPU", lora)


def test_blocks_are_keyed_by_their_tokens_and_chain() -> None:
    index = BlockIndex(capacity=100)
    assert index.stored(stored(list(range(8)), [b"a", b"b"]))
    assert index.block_size == SIZE and len(index) == 2
    # A continuation names its parent by vLLM's hash; the index chains it from the parent's key.
    assert index.stored(stored([8, 9, 10, 11], [b"c"], parent=b"b"))
    prompt = list(range(14))  # three full blocks and a partial one
    assert index.prefix(chain(prompt, SIZE, None)) == 3
    # Same third block's tokens after a different start: not held (the chain differs).
    assert index.prefix(chain([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11], SIZE, None)) == 1


def test_removed_cleared_and_unplaceable_blocks() -> None:
    index = BlockIndex(capacity=100)
    index.stored(stored(list(range(8)), [b"a", b"b"]))
    index.removed(BlockRemoved([b"b"], "GPU"))
    assert index.prefix(chain(list(range(8)), SIZE, None)) == 1
    assert not index.stored(stored([1, 1, 1, 1], [b"x"], parent=b"never-seen"))
    assert not index.stored(BlockStored([b"y"], None, [1, 2, 3], 3, None, "GPU", None))  # another block size
    index.clear()
    assert len(index) == 0 and index.prefix(chain(list(range(8)), SIZE, None)) == 0


def test_a_block_held_on_two_media_stays_until_both_are_removed() -> None:
    index = BlockIndex(capacity=100)
    index.stored(stored([1, 2, 3, 4], [b"gpu"]))
    index.stored(BlockStored([b"cpu"], None, [1, 2, 3, 4], SIZE, None, "CPU", None))
    index.removed(BlockRemoved([b"gpu"], "GPU"))
    assert index.prefix(chain([1, 2, 3, 4], SIZE, None)) == 1
    index.removed(BlockRemoved([b"cpu"], "CPU"))
    assert index.prefix(chain([1, 2, 3, 4], SIZE, None)) == 0


def test_lora_blocks_are_kept_apart() -> None:
    index = BlockIndex(capacity=100)
    index.stored(stored([1, 2, 3, 4], [b"l"], lora="sql-lora"))
    assert index.adapters == {"sql-lora"}
    assert Prompt([1, 2, 3, 4], "sql-lora").keys(SIZE, index.adapters) == chain([1, 2, 3, 4], SIZE, "sql-lora")
    assert index.prefix(Prompt([1, 2, 3, 4], "base").keys(SIZE, index.adapters)) == 0
    assert index.prefix(Prompt([1, 2, 3, 4], "sql-lora").keys(SIZE, index.adapters)) == 1


def test_credit_counts_until_confirmed_or_expired() -> None:
    index = BlockIndex(capacity=100)
    keys = chain(list(range(8)), SIZE, None)
    assert index.credit(keys, now=0.0) == 2
    assert index.prefix(keys, now=1.0) == 2
    assert index.prefix(keys, now=CREDIT_SECONDS + 1) == 0
    index.credit(keys, now=0.0)
    index.stored(stored(list(range(8)), [b"a", b"b"]))  # confirmed: held for good
    assert index.credited == 0 and index.prefix(keys, now=CREDIT_SECONDS + 1) == 2
    assert index.credit(keys) == 0


def test_memory_is_bounded_oldest_first() -> None:
    index = BlockIndex(capacity=3)
    for number in range(5):
        index.stored(stored([number] * SIZE, [bytes([number])]))
    assert len(index) == 3
    assert index.prefix(chain([0] * SIZE, SIZE, None)) == 0
    assert index.prefix(chain([4] * SIZE, SIZE, None)) == 1


def test_events_round_trip_and_unknown_event_types_are_skipped() -> None:
    batch = [stored([1, 2, 3, 4], [b"a"]), BlockRemoved([7], None), AllBlocksCleared()]
    assert decode(encode(batch, 1.0)) == batch
    payload = msgspec.msgpack.encode([1.0, [{"type": "SomethingNew", "x": 1}, {"type": "AllBlocksCleared"}], 0])
    assert decode(payload) == [AllBlocksCleared()]


def test_score_weighs_cache_against_load() -> None:
    assert cache_score(10, 10, 0, 8) == 1.0
    assert cache_score(0, 10, 0, 8) == 0.0
    # Holding everything at the whole slack of extra load is worth holding half while idle.
    assert cache_score(10, 10, 8, 8) == cache_score(5, 10, 0, 8)
    assert cache_score(0, 0, 2, 8) < cache_score(0, 0, 1, 8)


def fleet(count: int, context: zmq.asyncio.Context) -> Balancer:
    replicas = []
    for number in range(count):
        root = f"http://127.0.0.1:{9000 + number}/v1"
        replica = Replica(number, root, create_transport(root, idle_connections=1, timeout=5), VLLMProvider())
        replica.kv = Feed(context, endpoint="tcp://127.0.0.1:1", replay=None, capacity=1000, silence=10, fields={})
        replica.kv.connected = True
        replicas.append(replica)
    return Balancer(replicas, LBPolicy.CACHE_AWARE, eject_after=3, stale_after=15, slack=4)


def hold(replica: Replica, tokens: list[int]) -> None:
    assert replica.kv is not None
    hashes = [f"{replica.name}-{n}".encode() for n in range(len(tokens) // SIZE)]
    replica.kv.index.stored(stored(tokens[: len(hashes) * SIZE], hashes))


def test_the_replica_holding_most_of_the_prompt_wins_until_saturated() -> None:
    context = zmq.asyncio.Context()
    try:
        balancer = fleet(3, context)
        first, second, third = balancer.replicas
        prompt = list(range(40))
        hold(first, prompt[:8])
        hold(second, prompt[:32])
        hold(third, [])
        choice = Prompt(prompt, "m")
        assert balancer.pick({}, (), choice) is second
        second.in_flight = 3  # busier, within the slack: the cache still wins
        assert balancer.pick({}, (), choice) is second
        second.in_flight = 5  # past the slack: passed over, the next best holder takes it
        assert balancer.pick({}, (), choice) is first
        # vLLM's own queue (every gateway's requests) counts too, while recent.
        second.in_flight = 0
        second.load = Load(waiting=9, running=1, kv_cache=0.5, at=time.monotonic())
        assert balancer.pick({}, (), choice) is first
        second.load = Load(waiting=9, running=1, kv_cache=0.5, at=time.monotonic() - 60)
        assert balancer.pick({}, (), choice) is second
    finally:
        context.term()


def test_a_new_prefix_goes_to_one_replica_chosen_alike_everywhere() -> None:
    context = zmq.asyncio.Context()
    try:
        chosen = set()
        for _ in range(2):  # two gateways: two balancers over the same replicas' events
            balancer = fleet(4, context)
            for replica in balancer.replicas:
                hold(replica, list(range(8)))  # every replica holds the shared header
            picks = {balancer.pick({}, (), Prompt([*range(8), *[77] * 12], "m")).name for _ in range(20)}
            assert len(picks) == 1
            chosen |= picks
        assert len(chosen) == 1
        # Another document after the same header may go elsewhere: documents spread over replicas.
        balancer = fleet(4, context)
        for replica in balancer.replicas:
            hold(replica, list(range(8)))
        spread = {balancer.pick({}, (), Prompt([*range(8), *[n] * 12], "m")).name for n in range(40)}
        assert len(spread) > 1
    finally:
        context.term()


def test_untrusted_events_mean_routing_by_load() -> None:
    context = zmq.asyncio.Context()
    try:
        balancer = fleet(2, context)
        warm, cold = balancer.replicas
        hold(warm, list(range(16)))
        assert warm.kv is not None
        warm.kv.connected = False  # the subscription is down: what it says is not trusted
        warm.in_flight = 1
        assert balancer.pick({}, (), Prompt(list(range(16)), "m")) is cold
    finally:
        context.term()
