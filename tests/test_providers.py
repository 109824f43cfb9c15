"""Providers are pure translators: payload in, payload out, errors normalised."""

from __future__ import annotations

import orjson
import pytest

from inference_core import endpoints
from inference_core.errors import InvalidRequest, UnsupportedParameter
from inference_core.providers.base import Translation
from inference_core.providers.openai import OpenAIProvider
from inference_core.providers.vllm import VLLMProvider, parse_version


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.12.0", (0, 12, 0)), ("0.11.2.dev3+gabc", (0, 11, 2)), ("0.32.0+cpu", (0, 32, 0)), ("1.0", (1, 0))],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected


def test_vllm_untouched_payload_is_not_copied() -> None:
    payload = {"model": "m", "messages": [], "top_k": 3}
    translation = VLLMProvider().translate(endpoints.CHAT, payload)
    assert translation.payload is payload and not translation.changed


def test_vllm_learns_old_version() -> None:
    provider = VLLMProvider()
    provider.learn(b'{"version": "0.10.1"}')
    payload = {"guided_json": {"type": "object"}}
    assert VLLMProvider().translate(endpoints.CHAT, payload).changed
    assert not provider.translate(endpoints.CHAT, payload).changed


def test_vllm_error_code_becomes_openai_shaped() -> None:
    body = orjson.dumps({"error": {"message": "nope", "type": "NotFoundError", "param": "model", "code": 404}})
    error = VLLMProvider().classify_error(404, body)
    assert orjson.loads(error.body()) == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "model", "code": None}
    }


def test_html_error_page_is_not_echoed() -> None:
    error = VLLMProvider().classify_error(502, b"<html>upstream 10.0.0.7 down</html>")
    assert b"10.0.0.7" not in error.body() and error.status == 502


def test_openai_error_is_relayed_byte_for_byte() -> None:
    body = b'{"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": "x"}}'
    assert OpenAIProvider().classify_error(400, body).body() == body


def test_openai_completions_keep_best_of_and_echo() -> None:
    payload = {"prompt": "x", "best_of": 2, "echo": True}
    assert OpenAIProvider().translate(endpoints.COMPLETIONS, payload).dropped == ()
    assert OpenAIProvider().translate(endpoints.CHAT, {"messages": [], **payload}).dropped == ("best_of", "echo")


def test_openai_conflicting_schema_spellings() -> None:
    with pytest.raises(InvalidRequest):
        OpenAIProvider().translate(endpoints.CHAT, {"guided_json": {}, "response_format": {"type": "text"}})
    with pytest.raises(UnsupportedParameter):
        OpenAIProvider(drop_unsupported=False).translate(endpoints.CHAT, {"min_p": 0.1})


def test_vllm_routes_pass_through_untouched() -> None:
    """An OpenAI backend never sees them: the engine routes them to vLLM backends only."""
    payload = {"model": "m", "prompt": "x", "guided_json": {}, "top_k": 3}
    for endpoint in endpoints.VLLM:
        assert VLLMProvider().translate(endpoint, payload) == Translation(payload, changed=False)
    other = endpoints.passthrough("/v1/moderations")
    assert OpenAIProvider().translate(other, payload) == Translation(payload, changed=False)
