"""vLLM's own routes and any other ``/v1`` endpoint naming a model, passed through the gateway untouched."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from inference_core import endpoints
from inference_core.errors import NotFound
from tests.conftest import MODEL, sim_stats
from tests.servers import Server


def _post(http: httpx.Client, path: str, **body: Any) -> dict[str, Any]:
    response = http.post(path, json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_tokenize_and_detokenize_round_trip(http: httpx.Client) -> None:
    tokens = _post(http, "/tokenize", prompt="héllo")["tokens"]
    assert _post(http, "/detokenize", tokens=tokens)["prompt"] == "héllo"
    assert http.post("/tokenize", json={"prompt": "no model given"}).json()["count"] == 14  # INFERENCE_MODEL


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_on_every_path(http: httpx.Client, path: str) -> None:
    answer = _post(http, path, query="fruit", documents=["apple", "car", "pear"], top_n=2)
    scores = [result["relevance_score"] for result in answer["results"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score(http: httpx.Client, path: str) -> None:
    answer = _post(http, path, text_1="a", text_2=["b", "c"])
    assert [item["index"] for item in answer["data"]] == [0, 1]


def test_classify_and_pooling(http: httpx.Client) -> None:
    assert _post(http, "/classify", input=["great", "awful"])["data"][1]["num_classes"] == 2
    assert len(_post(http, "/pooling", input="x")["data"][0]["data"]) == 32


def test_bodies_reach_vllm_untouched(http: httpx.Client, simulator: Server) -> None:
    """No translation on vLLM's own routes: guided_* and unknown fields arrive as sent."""
    body = {"model": MODEL, "prompt": "x", "guided_json": {"type": "object"}, "add_special_tokens": False, "z": 1}
    assert http.post("/tokenize", json=body).status_code == 200
    assert sim_stats(simulator)["last_body"] == body


def test_the_sdk_reaches_v1_routes(client: openai.OpenAI) -> None:
    answer = client.post("/rerank", body={"model": MODEL, "query": "q", "documents": ["a"]}, cast_to=object)
    assert answer["results"][0]["index"] == 0  # type: ignore[index]


def test_any_other_v1_endpoint_naming_a_model_is_passed_through(http: httpx.Client, simulator: Server) -> None:
    for path in ("/v1/chat/completions/batch", "/v1/some/future/endpoint"):
        answer = _post(http, path, anything=[1, 2])
        assert answer == {"object": "echo", "path": path, "body": {"model": MODEL, "anything": [1, 2]}}
    metrics = http.get("/metrics").text
    assert 'endpoint="/v1/{path:path}"' in metrics and 'endpoint="/v1/chat/completions/batch"' in metrics


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/nothing", {"no": "model"}), ("POST", "/v1/nothing", [1]), ("GET", "/v1/nothing", None),
     ("DELETE", "/v1/models-ish", None), ("POST", "/v2/other", {"model": MODEL})],
)  # fmt: skip
def test_unknown_routes_stay_404(http: httpx.Client, method: str, path: str, body: object) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == 404 and response.json()["error"]["message"].startswith("Invalid URL")


@pytest.mark.parametrize("path", ["/v1/a/../../admin", "/v1/a//b", "/v1/a b", "/v1/%2e%2e/x", "/v1/"])
def test_passthrough_paths_are_plain(path: str) -> None:
    with pytest.raises(NotFound):
        endpoints.passthrough(path)
    assert endpoints.passthrough("/v1/audio/speech.v2").upstream == "audio/speech.v2"


def test_an_openai_backend_refuses_vllm_routes(openai_gateway: Server) -> None:
    response = httpx.post(openai_gateway.url + "/tokenize", json={"model": "gpt-4o", "prompt": "x"})
    assert response.status_code == 400 and "/tokenize" in response.json()["error"]["message"]


def test_every_endpoint_is_documented(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {endpoint.path for endpoint in endpoints.FORWARDED} <= paths.keys()
