"""cache_aware over a simulated vLLM fleet: real processes publishing vLLM's KV events on real ZMQ sockets.

Which replica answered is told the way a user sees it: ``usage.prompt_tokens_details.cached_tokens``
(a replica that did not hold the prompt reports none), and each simulator's own count of requests.
The gateway's view is read where an operator reads it: ``/health``, ``/metrics`` and the access log.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, free_port, held, metric, start_gateway, start_simulator, until

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
BLOCK = 16
#: 20 blocks of the simulator's byte tokens: a system prompt long enough to matter.
SYSTEM = "You are a careful assistant for the accounts team. " * 7


@dataclass
class Replica:
    server: Server
    events: str
    replay: str
    args: tuple[str, ...]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(self.server.url + "/_sim/stats").json()
        return stats

    def chats(self) -> int:
        return int(self.stats()["requests"].get("/v1/chat/completions", 0))


def replica(log_dir: Path, *extra: str, replay: bool = True) -> Replica:
    events, replay_at = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    args = (
        "--prefix-cache-blocks", "48", "--block-size", str(BLOCK), "--enable-prompt-tokens-details",
        "--kv-events", events, *(("--kv-replay", replay_at) if replay else ()), "--lora", "sql-lora", *extra,
    )  # fmt: skip
    return Replica(start_simulator(log_dir, *args), events, replay_at if replay else "", args)


def restart(log_dir: Path, old: Replica) -> Replica:
    """The same replica, started again on the same ports (the old process must have stopped)."""
    port = int(old.server.url.rsplit(":", 1)[1])
    return Replica(start_simulator(log_dir, *old.args, port=port), old.events, old.replay, old.args)


def gateway(log_dir: Path, replicas: list[Replica], **settings: str) -> Server:
    return start_gateway(
        log_dir,
        ",".join(r.server.url for r in replicas),
        lb_policy="cache_aware",
        kv_events=",".join(r.events for r in replicas),
        kv_replay=",".join(r.replay for r in replicas),
        kv_events_silence="1.5",
        probe_interval="0.5",
        **settings,
    )


@contextlib.contextmanager
def routing(log_dir: Path, replicas: list[Replica], **settings: str) -> Iterator[Server]:
    """A cache_aware gateway, once subscribed to every replica; stopped at the end (its output stays readable)."""
    server = gateway(log_dir, replicas, **settings)
    try:
        until(lambda: all(i["events"] == "up" for i in kv_index(server)), "subscribed to every replica")
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[Replica]]:
    replicas = [replica(tmp_path) for _ in range(3)]
    yield replicas
    for r in replicas:
        r.server.stop()


def chat(server: Server, text: str, *, system: str = SYSTEM, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}
    response = httpx.post(server.url + "/v1/chat/completions", json=body | extra, timeout=30)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def cached(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


def kv_index(server: Server) -> list[dict[str, Any]]:
    replicas = httpx.get(server.url + "/health").json()["backends"][0]["replicas"]
    return [r["kv_index"] for r in replicas]


def index_matches(server: Server, replicas: list[Replica]) -> bool:
    """The gateway's index holds exactly as many blocks as each replica's cache."""
    return [i["blocks"] for i in kv_index(server)] == [r.stats()["prefix_cache"]["blocks"] for r in replicas]


def test_requests_sharing_a_prefix_land_where_it_is_cached(tmp_path: Path, fleet: list[Replica]) -> None:
    with routing(tmp_path, fleet) as server:
        assert cached(chat(server, "first question")) == 0
        until(lambda: sum(i["blocks"] for i in kv_index(server)) > 0, "the replica's BlockStored reached the index")
        # Round robin would send two of every three elsewhere, cold.
        for number in range(6):
            assert cached(chat(server, f"question {number}")) >= len(SYSTEM) // BLOCK * BLOCK - BLOCK
        assert sorted(r.chats() for r in fleet) == [0, 0, 7]
        until(lambda: index_matches(server, fleet), "the index mirrors the replicas' caches")
        assert metric(server, "inference_core_routed_cached_blocks_count") == 7
        assert metric(server, "inference_core_kv_events_total", type="BlockStored") >= 7
        assert metric(server, "inference_core_kv_events_up") == 3
        # A LoRA adapter's blocks are its own: the first request for it finds nothing cached, the next does.
        assert cached(chat(server, "as the adapter", model="sql-lora")) == 0
        until(lambda: index_matches(server, fleet), "the adapter's blocks indexed apart")
        assert cached(chat(server, "as the adapter again", model="sql-lora")) > 0
        assert cached(chat(server, "as the base model again")) > 0
    logged = [json.loads(line) for line in server.output.splitlines() if '"cached_blocks"' in line]
    assert logged[0]["cached_blocks"] == 0 and min(line["cached_blocks"] for line in logged[1:]) > 0


def test_a_burst_with_a_new_prefix_lands_together_and_a_hot_prefix_is_released(
    tmp_path: Path, fleet: list[Replica]
) -> None:
    with routing(tmp_path, fleet, kv_load_slack="3") as server:
        body = {
            "model": MODEL, "stream": True, "sim_fault": "ttft=30",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hold"}],
        }  # fmt: skip
        # Four requests with a prefix nobody holds yet, at once: credited to the first choice, they stay together.
        with contextlib.ExitStack() as requests:
            for _ in range(4):
                requests.enter_context(held(server, "/v1/chat/completions", body))
            until(lambda: sum(r.chats() for r in fleet) == 4, "four requests reached the replicas")
            assert sorted(r.chats() for r in fleet) == [0, 0, 4]
            # The warm replica now has 4 more than the least busy (slack 3): the next goes elsewhere.
            answer = chat(server, "one more")
            assert cached(answer) == 0 and sorted(r.chats() for r in fleet) == [0, 1, 4]


def test_two_gateways_agree_and_a_late_one_learns_from_replay(tmp_path: Path, fleet: list[Replica]) -> None:
    with routing(tmp_path, fleet) as first:
        chat(first, "warm it up")
        until(lambda: index_matches(first, fleet), "the first gateway's index is current")
        # Started after: learns the idle replicas' caches by replay.
        with routing(tmp_path, fleet) as second:
            until(lambda: index_matches(second, fleet), "the late gateway replayed what the replicas hold")
            assert cached(chat(second, "from the other gateway")) > 0
            # A new prefix, sent to each: both choose the same replica, sharing nothing but the replicas' events
            # (the second request may come before the first's events: by the tie-break, or by them, alike).
            before = [r.chats() for r in fleet]
            prompt = "Yet another system prompt, for the sales team. " * 6
            chat(second, "y", system=prompt)
            chat(first, "x", system=prompt)
            after = [r.chats() for r in fleet]
            assert sorted(b - a for a, b in zip(before, after, strict=True)) == [0, 0, 2]


def test_a_stopped_replica_is_failed_over_and_restarted_starts_empty(tmp_path: Path, fleet: list[Replica]) -> None:
    with routing(tmp_path, fleet) as server:
        chat(server, "before the restart")
        until(lambda: index_matches(server, fleet), "index current")
        warm = next(number for number, r in enumerate(fleet) if r.chats())
        fleet[warm].server.stop()
        # While it is down, the prompt it held is answered by another replica (retried there, cold).
        assert cached(chat(server, "while it is down")) == 0
        until(lambda: kv_index(server)[warm]["blocks"] == 0, "the stopped replica's entries dropped")
        fleet[warm] = restart(tmp_path, fleet[warm])
        until(lambda: kv_index(server)[warm]["events"] == "up", "events followed again")
        chat(server, "after the restart")  # cold everywhere now
        until(lambda: index_matches(server, fleet), "index current after the restart")
    assert "kv index cleared" in server.output


@pytest.mark.parametrize("replayable", [True, False], ids=["replayed", "no-replay-socket"])
def test_a_gap_is_filled_by_replay_or_else_the_entries_are_dropped(tmp_path: Path, replayable: bool) -> None:
    alone = replica(tmp_path, replay=replayable)
    try:
        with routing(tmp_path, [alone]) as server:
            chat(server, "a", system="The first prompt, whose events reach the gateway. " * 4)
            until(lambda: index_matches(server, [alone]), "index current")
            assert httpx.post(alone.server.url + "/_sim/kv", json={"drop": 1}).status_code == 200
            chat(server, "b", system="A second prompt, whose events are lost on the way. " * 4)
            chat(server, "c", system="A third prompt: its events show the gap in seq. " * 4)
            caught_up = alone.stats()["kv_events"]["next_seq"] - 1
            until(lambda: kv_index(server)[0]["last_seq"] == caught_up, "the gateway reached the last batch")
            index, cache = kv_index(server)[0]["blocks"], alone.stats()["prefix_cache"]["blocks"]
    finally:
        alone.server.stop()
    if replayable:
        assert index == cache  # the lost batch was replayed
    else:
        assert index < cache  # no replay: what came before the gap was dropped, not trusted
        assert "kv index cleared" in server.output


def test_a_silent_replica_is_routed_by_load_until_its_events_return(tmp_path: Path, fleet: list[Replica]) -> None:
    with routing(tmp_path, fleet) as server:
        chat(server, "warm")
        until(lambda: index_matches(server, fleet), "index current")
        warm = next(number for number, r in enumerate(fleet) if r.chats())
        httpx.post(fleet[warm].server.url + "/_sim/kv", json={"silent": True})
        chat(server, "new blocks, whose events never come", system=SYSTEM + "and a longer tail. " * 4)
        until(lambda: metric(server, "inference_core_kv_events_up", replica=f"r{warm}") == 0, "marked down")
        assert kv_index(server)[warm]["events"] == "down"
        chat(server, "routed by load while its events are missing")
        until(lambda: "kv events down; routed by load" in server.output, "one log line says so")
        httpx.post(fleet[warm].server.url + "/_sim/kv", json={"silent": False})

        def events_flow_again() -> bool:
            if kv_index(server)[warm]["events"] == "up":
                return True
            chat(server, "anything", system=f"{uuid.uuid4().hex}: a prompt no replica holds. " * 3)
            return False

        until(events_flow_again, "its next events (and the replayed gap) bring it back")
        until(lambda: index_matches(server, fleet), "the replay filled what it kept back")
    assert server.output.count("kv events down; routed by load") == 1


def test_a_prompt_that_cannot_be_tokenized_is_routed_by_load(tmp_path: Path, fleet: list[Replica]) -> None:
    with routing(tmp_path, fleet) as server:
        body = {"model": MODEL, "prompt": ["two prompts", "in one request"], "max_tokens": 4}
        for _ in range(3):  # the replicas' /tokenize refuses several prompts; the requests are still served
            answer = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
        assert sum(r.stats()["requests"].get("/v1/completions", 0) for r in fleet) == 3
    assert server.output.count("prompt not tokenized; routed by load") == 1
