"""OpenAI's dialect: guided JSON becomes ``response_format``; vLLM-only parameters are dropped.

OpenAI answers 400 to any parameter it does not know, so a client written for vLLM would fail.
Parameters OpenAI lacks are removed and reported (header ``x-inference-dropped-params``), or
refused with 400 when the operator prefers to know (``INFERENCE_DROP_UNSUPPORTED_PARAMS=false``).
"""

from __future__ import annotations

from typing import Any

import orjson

from inference_core.endpoints import CHAT, OPENAI, Endpoint
from inference_core.errors import InvalidRequest, UnsupportedParameter, UpstreamStatusError
from inference_core.providers.base import Payload, Translation, error_payload, normalise_error

#: vLLM extensions that OpenAI rejects, for every endpoint.
_VLLM_ONLY = frozenset(
    {
        "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search", "ignore_eos",
        "min_tokens", "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
        "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
        "allowed_token_ids", "bad_words", "add_special_tokens", "add_generation_prompt",
        "continue_final_message", "chat_template", "chat_template_kwargs", "documents",
        "mm_processor_kwargs", "priority", "request_id", "cache_salt", "return_tokens_as_token_ids",
        "return_token_ids", "kv_transfer_params", "vllm_xargs", "guided_decoding_backend",
        "guided_whitespace_pattern", "logits_processors", "normalize", "embed_dtype",
        "additional_data", "use_activation", "guided_json", "structured_outputs",
    }
)  # fmt: skip
#: Legal in OpenAI's legacy completions API, vLLM-only in chat.
_CHAT_ONLY_VLLM = frozenset({"best_of", "echo"})
#: Constraints with no OpenAI equivalent.
_UNEXPRESSIBLE = {"guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class OpenAIProvider:
    name = "openai"
    discovery_path: str | None = None
    health_path = "models"

    def __init__(self, *, drop_unsupported: bool = True) -> None:
        self.drop_unsupported = drop_unsupported
        self.version: str | None = None

    def learn(self, body: bytes) -> None:
        """OpenAI needs no discovery."""

    def translate(self, endpoint: Endpoint, payload: Payload) -> Translation:
        if endpoint not in OPENAI:
            return Translation(payload, changed=False)
        unsupported = _VLLM_ONLY | _CHAT_ONLY_VLLM if endpoint is CHAT else _VLLM_ONLY
        guided = _json_schema(payload)
        translated = guided[0] if guided else None
        dropped = tuple(field for field in payload if field in unsupported and field != translated)
        if guided is None and not dropped:
            return Translation(payload, changed=False)
        if dropped and not self.drop_unsupported:
            raise UnsupportedParameter(f"'{dropped[0]}' is not supported by the OpenAI backend.", param=dropped[0])
        payload = {key: value for key, value in payload.items() if key not in unsupported}
        if guided is not None:
            field, schema = guided
            if "response_format" in payload:
                raise InvalidRequest(f"Give either '{field}' or 'response_format', not both.", param=field)
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema, "strict": True},
            }
        return Translation(payload, changed=True, dropped=dropped)

    def classify_error(self, status: int, body: bytes) -> UpstreamStatusError:
        if error_payload(body) is not None:
            return UpstreamStatusError(status, {}, raw=body)
        return normalise_error(status, body)


def _json_schema(payload: Payload) -> tuple[str, dict[str, Any]] | None:
    """The JSON schema a client asked for through vLLM's spellings, as (field, schema).

    Raises ``UnsupportedParameter`` for constraints OpenAI cannot enforce.
    """
    for field in _UNEXPRESSIBLE:
        if payload.get(field) is not None:
            raise UnsupportedParameter(f"'{field}' has no equivalent on the OpenAI backend.", param=field)
    structured = payload.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise InvalidRequest("'structured_outputs' must be an object.", param="structured_outputs")
        for kind in structured.keys() - {"json", "whitespace_pattern", "disable_any_whitespace"}:
            raise UnsupportedParameter(
                f"'structured_outputs.{kind}' has no equivalent on the OpenAI backend.",
                param=f"structured_outputs.{kind}",
            )
        if structured.get("json") is not None:
            return "structured_outputs", _schema(structured["json"], "structured_outputs.json")
    if payload.get("guided_json") is not None:
        return "guided_json", _schema(payload["guided_json"], "guided_json")
    return None


def _schema(value: object, param: str) -> dict[str, Any]:
    """vLLM takes a schema as an object or as JSON text; OpenAI only as an object."""
    if isinstance(value, str | bytes):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise InvalidRequest(f"'{param}' is not valid JSON.", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be a JSON schema object.", param=param)
    return value
