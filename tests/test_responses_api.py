"""OpenAI's Responses API through the gateway: stored responses stay reachable behind a balancer.

vLLM keeps stored responses in the memory of the replica that created them, and so does the
simulator: any call that lands on another replica gets a 404. The gateway remembers where each
response was made and sends ``previous_response_id`` and ``/v1/responses/{id}`` calls there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import MODEL, sim_stats
from tests.servers import Server

Spawn = Callable[..., Server]


@pytest.fixture
def replicas(spawn: Spawn) -> tuple[Server, Server]:
    return spawn("simulator"), spawn("simulator")


@pytest.fixture
def sdk(spawn: Spawn, replicas: tuple[Server, Server]) -> Iterator[openai.OpenAI]:
    gateway = spawn("gateway", ",".join(r.url for r in replicas), lb_policy="round_robin")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_previous_response_id_lands_on_the_right_replica_every_time(
    sdk: openai.OpenAI, replicas: tuple[Server, Server]
) -> None:
    first = sdk.responses.create(model=MODEL, input="Start a story.")
    assert first.object == "response" and first.output_text
    previous = first.id
    for turn in range(100):
        follow = sdk.responses.create(model=MODEL, input=f"Go on ({turn}).", previous_response_id=previous)
        assert follow.previous_response_id == previous
        previous = follow.id
    # Round robin would have split them; the chain stayed where it started.
    counts = sorted(sim_stats(replica)["requests"].get("/v1/responses", 0) for replica in replicas)
    assert counts == [0, 101]


def test_streamed_responses_are_remembered_too(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(model=MODEL, input="Hello") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        created = stream.get_final_response()
    assert text.strip() == created.output_text.strip()
    for _ in range(4):  # with round robin, each would otherwise have a one-in-two chance of a 404
        assert sdk.responses.create(model=MODEL, input="More", previous_response_id=created.id).id


def test_calls_on_a_stored_response_reach_its_replica(sdk: openai.OpenAI) -> None:
    made = [sdk.responses.create(model=MODEL, input=f"Hi {n}") for n in range(4)]
    for n, response in enumerate(made):
        assert sdk.responses.retrieve(response.id).id == response.id
        assert [item.content for item in sdk.responses.input_items.list(response.id).data] == [f"Hi {n}"]
        assert sdk.responses.cancel(response.id).status == "cancelled"
    sdk.responses.delete(made[0].id)
    with pytest.raises(openai.NotFoundError) as gone:
        sdk.responses.retrieve(made[0].id)
    assert gone.value.body["code"] == "response_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/responses/resp_unknown"), ("DELETE", "/v1/responses/resp_unknown"),
     ("POST", "/v1/responses/resp_unknown/cancel"), ("GET", "/v1/responses/resp_unknown/input_items")],
)  # fmt: skip
def test_unknown_ids_are_answered_by_the_gateway(gateway: Server, simulator: Server, method: str, path: str) -> None:
    before = sim_stats(simulator)["requests"].get(path, 0)
    response = httpx.request(method, gateway.url + path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "response_not_found"
    assert sim_stats(simulator)["requests"].get(path, 0) == before
    chained = httpx.post(
        gateway.url + "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_unknown"}
    )
    assert chained.status_code == 404 and chained.json()["error"]["param"] == "response_id"


def test_other_paths_under_responses_are_404(http: httpx.Client) -> None:
    assert http.post("/v1/responses/resp_1/other").status_code == 404
    assert http.put("/v1/responses/resp_1").status_code == 404
