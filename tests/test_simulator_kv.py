"""The simulator as a vLLM replica's prefix cache: its blocks, hashes, KV events on ZMQ, and prefill timing.

The cache itself is tested without sockets; the events, replay, hooks and metrics over real
sockets, with a ZMQ subscriber and a DEALER as a gateway would use them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import zmq
from starlette.testclient import TestClient

from inference_core.kvcache import events
from inference_core.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored
from inference_core.simulator import SimulatorConfig, create_simulator
from inference_core.simulator.prefix_cache import Adapter, PrefixCache
from tests.conftest import MODEL, chat_body
from tests.servers import Server, free_port, held, metric, start_simulator, until

LORA = "sql-lora"
ADAPTER = Adapter(LORA, 1, LORA)
#: vLLM 0.32's hashes of blocks 0-15 and 16-31 of ``range(40)`` (``hash_block_tokens`` with its
#: default sha256), and of block 0-15 for the adapter above (extra keys ``(("lora", name, path),)``).
VLLM_HASHES = (
    "fe8fa5dda3210d0ca2031e37cbe3b001186773cd1c710beb2d45fcb51d434798",
    "8be7aaa33831156d316f1f463ae57e643deb63f42e633e2d631df88815cc4629",
)
VLLM_LORA_HASH = "6e0d034fb47c8a21c206000e98218d788ca54e2195debf07834b5769cc29d578"


# The cache, without sockets.


def test_hashes_are_vllms_chained_sha256() -> None:
    cache = PrefixCache(8)
    assert [block.hex() for block in cache.hashes(range(40))] == list(VLLM_HASHES), "a partial block is not hashed"
    assert cache.hashes(range(40)) == PrefixCache(1).hashes(range(40)), "two replicas name the same tokens alike"
    assert cache.hashes(range(40), ADAPTER)[0].hex() == VLLM_LORA_HASH


def test_admission_hits_whole_blocks_and_stores_the_rest_chained() -> None:
    cache = PrefixCache(16)
    first = list(range(40))
    admitted = cache.admit(first)
    hashes = cache.hashes(first)
    assert admitted.cached_tokens == 0
    assert admitted.events == [
        BlockStored(hashes, None, first[:32], 16, None, "GPU", None, [None, None]),
    ]
    cache.release(admitted)
    longer = [*first, *range(100, 130)]
    again = cache.admit(longer)
    longer_hashes = cache.hashes(longer)
    assert longer_hashes[:2] == hashes
    assert again.cached_tokens == 32
    assert again.events == [
        BlockStored(longer_hashes[2:], hashes[-1], longer[32:64], 16, None, "GPU", None, [None, None]),
    ]
    assert (cache.queries, cache.hits) == (40 + 70, 32)


def test_a_wholly_cached_prompt_recomputes_its_last_block() -> None:
    cache = PrefixCache(16)
    cache.release(cache.admit(range(32)))
    again = cache.admit(range(32))
    assert again.cached_tokens == 16, "vLLM recomputes the last token, so its whole block"
    assert again.events == [], "the block is held already: nothing new stored"


def test_eviction_is_lru_tail_first_and_spares_referenced_blocks() -> None:
    cache = PrefixCache(4)
    a, b, c = range(0, 33), range(100, 133), range(200, 233)
    cache.release(cache.admit(a))
    cache.release(cache.admit(b))
    cache.release(cache.admit(a))  # a used again: b is now the least recently used
    running = cache.admit(c)
    b_hashes = cache.hashes(b)
    removed = [BlockRemoved([b_hashes[1]], medium="GPU"), BlockRemoved([b_hashes[0]], medium="GPU")]
    assert running.events[:2] == removed, "evictions first, the tail of a prompt before its head"
    assert isinstance(running.events[2], BlockStored) and running.events[2].block_hashes == cache.hashes(c)
    assert (len(cache), cache.in_use) == (4, 2)
    # c is running: only a's blocks may go, and a prompt too long for the rest is cached in part.
    crowded = cache.admit(range(300, 349))
    assert [type(event) for event in crowded.events] == [BlockRemoved, BlockRemoved, BlockStored]
    stored = crowded.events[2]
    assert isinstance(stored, BlockStored) and len(stored.block_hashes) == 2
    assert cache.admit(range(400, 433)).events == [], "everything is referenced: nothing stored"


def test_lora_blocks_are_kept_apart() -> None:
    cache = PrefixCache(8)
    cache.release(cache.admit(range(40)))
    adapted = cache.admit(range(40), ADAPTER)
    assert adapted.cached_tokens == 0
    (stored,) = adapted.events
    assert isinstance(stored, BlockStored)
    assert (stored.lora_id, stored.lora_name, stored.extra_keys) == (1, LORA, [[LORA], [LORA]])
    assert stored.block_hashes == cache.hashes(range(40), ADAPTER) != cache.hashes(range(40))


def test_reset_waits_for_running_requests_unless_forced() -> None:
    cache = PrefixCache(8)
    running = cache.admit(range(40))
    assert cache.reset() is None
    assert cache.reset(force=True) == [AllBlocksCleared()]
    cache.release(running)  # from before the reset: nothing to hand back
    assert (len(cache), cache.in_use) == (0, 0)
    assert cache.reset() == [AllBlocksCleared()]


# A simulator publishing its events.


class Subscriber:
    """A SUB socket on a simulator's events, and a DEALER on its replay socket."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], pub: str, replay: str, topic: bytes) -> None:
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(pub)
        self.dealer = context.socket(zmq.DEALER)
        self.dealer.connect(replay)
        self.topic = topic

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close(linger=0)

    def receive(self, seconds: float = 10.0) -> tuple[int, bytes]:
        assert self.sub.poll(int(seconds * 1000)), "no KV event batch arrived"
        topic, seq, payload = self.sub.recv_multipart()
        assert topic == self.topic
        return events.seq_of(seq), payload

    def batch(self) -> tuple[int, list[events.Event]]:
        seq, payload = self.receive()
        return seq, events.decode(payload)

    def synchronize(self, server: Server) -> None:
        """Reset the cache until this subscriber hears about it, then read up to the last batch sent.

        A SUB socket misses what is published before its subscription arrives; this waits for it.
        """

        def heard() -> bool:
            httpx.post(server.url + "/reset_prefix_cache").raise_for_status()
            return bool(self.sub.poll(100))

        until(heard, "the subscriber never heard the simulator")
        last = httpx.get(server.url + "/_sim/stats").json()["kv_events"]["next_seq"] - 1
        until(lambda: self.receive()[0] == last, "the batches before the last never arrived")

    def replay(self, start: int) -> list[tuple[int, bytes]]:
        self.dealer.send_multipart([b"", events.seq_bytes(start)])
        batches = []
        while True:
            assert self.dealer.poll(10_000), "the replay never ended"
            empty, topic, seq, payload = self.dealer.recv_multipart()
            assert empty == b""
            if seq == events.END_SEQ:
                assert (topic, payload) == (b"", b"")
                return batches
            assert topic == self.topic
            batches.append((events.seq_of(seq), payload))


@pytest.fixture(scope="module")
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def _kv_simulator(log_dir: Path, *args: str, pub: int, replay: int, port: int | None = None) -> Server:
    return start_simulator(
        log_dir,
        "--lora", LORA, "--enable-prompt-tokens-details", "--kv-topic", "kv",
        "--kv-events", f"tcp://127.0.0.1:{pub}", "--kv-replay", f"tcp://127.0.0.1:{replay}",
        *args,
        port=port,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cached(log_dir: Path) -> Iterator[tuple[Server, str, str]]:
    """A simulator with a 6-block cache; its PUB and replay endpoints."""
    pub, replay = free_port(), free_port()
    server = _kv_simulator(log_dir, "--prefix-cache-blocks", "6", pub=pub, replay=replay)
    yield server, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"
    server.stop()


@pytest.fixture
def sim(cached: tuple[Server, str, str]) -> Server:
    return cached[0]


@pytest.fixture
def subscriber(context: zmq.Context[zmq.Socket[bytes]], cached: tuple[Server, str, str]) -> Iterator[Subscriber]:
    server, pub, replay = cached
    subscriber = Subscriber(context, pub, replay, b"kv")
    subscriber.synchronize(server)
    yield subscriber
    subscriber.close()


def _chat(server: Server, *contents: str, **extra: Any) -> dict[str, Any]:
    body = chat_body(messages=[{"role": "user", "content": content} for content in contents], **extra)
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def _tokens(server: Server, *contents: str) -> list[int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content} for content in contents]}
    tokens: list[int] = httpx.post(server.url + "/tokenize", json=body).json()["tokens"]
    return tokens


def test_blocks_stored_are_tokenizes_full_blocks_chained(sim: Server, subscriber: Subscriber) -> None:
    first = "The quick brown fox jumps over the lazy dog"  # 43 bytes: 2 full blocks
    answer = _chat(sim, first)
    ids = _tokens(sim, first)
    assert answer["usage"]["prompt_tokens"] == len(ids) == 43
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    seq, payload = subscriber.receive()
    # vLLM's own layout: [ts, [events], data_parallel_rank], each event a map tagged by type.
    ts, raw_events, rank = msgspec.msgpack.decode(payload)
    assert isinstance(ts, float) and rank == 0
    assert [event["type"] for event in raw_events] == ["BlockStored"]
    assert raw_events[0]["medium"] == "GPU" and raw_events[0]["lora_id"] is None
    (stored,) = events.decode(payload)
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == ids[:32] and stored.block_size == 16
    assert stored.parent_block_hash is None and stored.extra_keys == [None, None]
    assert stored.block_hashes == PrefixCache(6).hashes(ids)

    second = _chat(sim, first, "and runs away.")  # the chat's text: first + "\n" + second, 58 bytes
    longer = _tokens(sim, first, "and runs away.")
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    next_seq, (more,) = subscriber.batch()
    assert next_seq == seq + 1
    assert isinstance(more, BlockStored)
    assert more.parent_block_hash == stored.block_hashes[-1]
    assert more.token_ids == longer[32:48]
    assert more.block_hashes == PrefixCache(6).hashes(longer)[2:]


def test_completions_prompt_is_cached_as_tokenize_sees_it(sim: Server, subscriber: Subscriber) -> None:
    prompt = "Once upon a time, in a land far away, "
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
    assert httpx.post(sim.url + "/v1/completions", json=body).json()["usage"]["prompt_tokens"] == len(prompt)
    (stored,) = subscriber.batch()[1]
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == httpx.post(sim.url + "/tokenize", json=body).json()["tokens"][:32]


def test_eviction_when_full_publishes_block_removed(sim: Server, subscriber: Subscriber) -> None:
    prompts = ["a" * 50, "b" * 50, "c" * 50]  # 3 blocks each; the cache holds 6
    _chat(sim, prompts[0])
    _chat(sim, prompts[1])
    assert [type(event) for event in subscriber.batch()[1] + subscriber.batch()[1]] == [BlockStored, BlockStored]
    _chat(sim, prompts[2])
    evicted = subscriber.batch()[1]
    oldest = PrefixCache(6).hashes(_tokens(sim, prompts[0]))
    assert evicted[:3] == [BlockRemoved([block], medium="GPU") for block in reversed(oldest)]
    assert isinstance(evicted[3], BlockStored) and evicted[3].token_ids == [ord("c")] * 48
    assert httpx.get(sim.url + "/_sim/stats").json()["prefix_cache"]["blocks"] == 6


def test_lora_requests_keep_their_blocks_apart(sim: Server, subscriber: Subscriber) -> None:
    text = "Select every row of the orders table"  # 36 bytes: 2 blocks
    _chat(sim, text)
    base = subscriber.batch()[1][0]
    answer = _chat(sim, text, model=LORA)
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}, (
        "the base model's blocks are not the adapter's"
    )
    adapted = subscriber.batch()[1][0]
    assert isinstance(base, BlockStored) and isinstance(adapted, BlockStored)
    assert (adapted.lora_name, adapted.lora_id, adapted.extra_keys) == (LORA, 1, [[LORA], [LORA]])
    assert adapted.token_ids == base.token_ids
    assert set(adapted.block_hashes).isdisjoint(base.block_hashes)


def test_replay_returns_the_buffered_batches_then_end(sim: Server, subscriber: Subscriber) -> None:
    _chat(sim, "x" * 20)
    _chat(sim, "y" * 20)
    heard = [subscriber.receive(), subscriber.receive()]
    replayed = subscriber.replay(heard[0][0])
    assert replayed == heard
    assert subscriber.replay(heard[-1][0] + 1) == [], "nothing newer: just the end"
    assert [seq for seq, _ in subscriber.replay(0)][:1] == [0], "every batch since start is kept"


def test_a_dropped_batch_is_a_gap_that_replay_fills(sim: Server, subscriber: Subscriber) -> None:
    assert httpx.post(sim.url + "/_sim/kv", json={"drop": 1}).json()["dropping"] == 1
    _chat(sim, "m" * 20)
    _chat(sim, "n" * 20)
    seq, payload = subscriber.receive()
    (missed_seq, missed), (heard_seq, heard) = subscriber.replay(seq - 1)
    assert (missed_seq, heard_seq, heard) == (seq - 1, seq, payload), "the first batch never came: a gap"
    (stored,) = events.decode(missed)
    assert isinstance(stored, BlockStored) and stored.token_ids == [ord("m")] * 16


def test_silence_withholds_batches_until_lifted(sim: Server, subscriber: Subscriber) -> None:
    before = httpx.get(sim.url + "/_sim/stats").json()["kv_events"]["next_seq"]
    assert httpx.post(sim.url + "/_sim/kv", json={"silent": True}).json()["silent"] is True
    _chat(sim, "p" * 20)
    _chat(sim, "q" * 20)
    state = httpx.post(sim.url + "/_sim/kv", json={"silent": False}).json()
    assert (state["next_seq"], state["dropping"], state["silent"]) == (before + 2, 0, False)
    _chat(sim, "r" * 20)
    assert subscriber.receive()[0] == before + 2, "the two silent batches were never sent"
    assert [seq for seq, _ in subscriber.replay(before)] == [before, before + 1, before + 2]
    assert httpx.post(sim.url + "/_sim/kv", json={"drop": -1}).status_code == 400


def test_reset_prefix_cache_clears_and_says_so(sim: Server, subscriber: Subscriber) -> None:
    text = "Remember this sentence, please"  # 30 bytes: 1 block
    _chat(sim, text)
    subscriber.batch()
    assert httpx.post(sim.url + "/reset_prefix_cache").json() == {"success": True}
    assert subscriber.batch()[1] == [AllBlocksCleared()]
    assert _chat(sim, text)["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert [type(event) for event in subscriber.batch()[1]] == [BlockStored]


def test_prefix_cache_metrics_and_streamed_cached_tokens(sim: Server, subscriber: Subscriber) -> None:
    queries, hits = metric(sim, "vllm:prefix_cache_queries_total"), metric(sim, "vllm:prefix_cache_hits_total")
    text = "s" * 40
    _chat(sim, text)
    body = chat_body(messages=[{"role": "user", "content": text}], stream=True, stream_options={"include_usage": True})
    frames = httpx.post(sim.url + "/v1/chat/completions", json=body).text.split("\n\n")
    usage = [frame for frame in frames if '"usage":{' in frame]
    assert len(usage) == 1 and '"prompt_tokens_details":{"cached_tokens":32}' in usage[0]
    assert metric(sim, "vllm:prefix_cache_queries_total", engine="0") == queries + 80, "counted in tokens"
    assert metric(sim, "vllm:prefix_cache_hits_total", model_name=MODEL) == hits + 32
    stats = httpx.get(sim.url + "/_sim/stats").json()["prefix_cache"]
    assert (stats["query_tokens"], stats["hit_tokens"]) == (queries + 80, hits + 32)


def test_defaults_model_no_cache(simulator: Server) -> None:
    answer = _chat(simulator, "Hello there, general settings")
    assert "prompt_tokens_details" not in answer["usage"]
    assert metric(simulator, "vllm:prefix_cache_queries_total") == 0
    stats = httpx.get(simulator.url + "/_sim/stats").json()
    assert (stats["prefix_cache"], stats["kv_events"]) == (None, None)
    assert httpx.post(simulator.url + "/_sim/kv", json={"drop": 1}).status_code == 404


def test_a_restarted_simulator_rebinds_at_once_and_counts_from_zero(
    log_dir: Path, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    pub, replay, port = free_port(), free_port(), free_port()
    endpoints = (f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}")
    subscriber = Subscriber(context, *endpoints, b"kv")
    try:
        first = _kv_simulator(log_dir, "--prefix-cache-blocks", "4", pub=pub, replay=replay, port=port)
        subscriber.synchronize(first)
        _chat(first, "z" * 20)
        subscriber.receive()
        first.stop()
        second = _kv_simulator(log_dir, "--prefix-cache-blocks", "4", pub=pub, replay=replay, port=port)
        try:
            state = httpx.get(second.url + "/_sim/stats").json()["kv_events"]
            assert (state["next_seq"], state["endpoint"], state["replay_endpoint"]) == (0, *endpoints)
            subscriber.synchronize(second)  # the same SUB socket: it reconnects by itself
            assert [seq for seq, _ in subscriber.replay(0)][:1] == [0]
        finally:
            second.stop()
    finally:
        subscriber.close()


# Time to first token.


@pytest.fixture(scope="module")
def slow_prefill(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir, "--prefix-cache-blocks", "256", "--prefill-per-token", "0.001")
    yield server
    server.stop()


def _timed_chat(server: Server, text: str) -> float:
    start = time.perf_counter()
    _chat(server, text)
    return time.perf_counter() - start


def test_a_cached_prompt_is_prefilled_sooner(slow_prefill: Server) -> None:
    text = "".join(chr(ord("a") + index % 26) for index in range(800))  # 800 tokens: 0.8 s uncached
    uncached = _timed_chat(slow_prefill, text)
    cached = _timed_chat(slow_prefill, text)  # 784 tokens cached: 16 to prefill
    assert cached * 4 < uncached


def test_prefills_queue_one_at_a_time(slow_prefill: Server) -> None:
    def counts() -> tuple[float, float]:
        return metric(slow_prefill, "vllm:num_requests_running"), metric(slow_prefill, "vllm:num_requests_waiting")

    def stream(letter: str) -> dict[str, Any]:
        return chat_body(messages=[{"role": "user", "content": letter * 6000}], stream=True)  # 6 s each

    with held(slow_prefill, "/v1/chat/completions", stream("f")):
        until(lambda: counts() == (1, 0), "the first prompt is not being prefilled")
        with (
            held(slow_prefill, "/v1/chat/completions", stream("g")),
            held(slow_prefill, "/v1/chat/completions", stream("h")),
        ):
            until(lambda: counts() == (1, 2), "the later prompts are not waiting their turn")
    until(lambda: counts() == (0, 0), "the abandoned prefills were not dropped")


# The tokenizer directory.

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer with a ChatML template, as a model's directory holds it."""
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("tokenizer")
    bpe = tokenizers.ByteLevelBPETokenizer()
    corpus = ["The quick brown fox jumps over the lazy dog, then naps in the sun."] * 20
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1, special_tokens=["<|im_start|>", "<|im_end|>"])
    bpe.save(str(directory / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_a_tokenizer_directory_tokenizes_for_tokenize_and_the_cache(tokenizer_dir: Path) -> None:
    from inference_core.kvcache.tokenizer import PromptTokenizer

    config = SimulatorConfig(tokenizer=str(tokenizer_dir), prefix_cache_blocks=64, prompt_tokens_details=True)
    body = chat_body(messages=[{"role": "user", "content": "The lazy dog naps, the quick fox jumps. " * 4}])
    ids = PromptTokenizer.load(tokenizer_dir).tokens(body)
    assert ids != list(_text_bytes(body)), "not the byte path"
    with TestClient(create_simulator(config)) as client:
        assert client.post("/tokenize", json=body).json()["tokens"] == ids
        first = client.post("/v1/chat/completions", json=body).json()["usage"]
        again = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert first["prompt_tokens"] == again["prompt_tokens"] == len(ids)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["prompt_tokens_details"] == {"cached_tokens": (len(ids) - 1) // 16 * 16}


def _text_bytes(body: dict[str, Any]) -> bytes:
    return "\n".join(message["content"] for message in body["messages"]).encode()
