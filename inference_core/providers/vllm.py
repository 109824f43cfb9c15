"""vLLM's dialect: the OpenAI API plus sampling extensions, and a changed guided-decoding API.

vLLM 0.12 removed the ``guided_*`` request fields and now ignores them silently (HTTP 200,
unconstrained output). Clients written for older servers still send them, so they are moved
into ``structured_outputs`` when the backend is new enough to need it.
"""

from __future__ import annotations

import re

import orjson

from inference_core.endpoints import CHAT, COMPLETIONS, Endpoint
from inference_core.errors import UpstreamStatusError
from inference_core.providers.base import Payload, Translation, normalise_error

#: guided_* field -> its key inside ``structured_outputs``.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}
STRUCTURED_OUTPUTS_SINCE = (0, 12)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.12.1.dev3+g1234"`` -> ``(0, 12, 1)``."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0].split(".dev")[0])[:3])


class VLLMProvider:
    name = "vllm"
    discovery_path: str | None = "../version"
    health_path = "../health"

    def __init__(self) -> None:
        #: Unknown until the backend has told us; new servers are the ones that need translating.
        self.version: str | None = None
        self.translate_guided = True

    def learn(self, body: bytes) -> None:
        data = orjson.loads(body)
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, str):
            self.version = version
            self.translate_guided = parse_version(version) >= STRUCTURED_OUTPUTS_SINCE

    def translate(self, endpoint: Endpoint, payload: Payload) -> Translation:
        if (endpoint is not CHAT and endpoint is not COMPLETIONS) or not self.translate_guided:
            return Translation(payload, changed=False)
        guided = [field for field in GUIDED_FIELDS if field in payload]
        if not guided:
            return Translation(payload, changed=False)
        payload = dict(payload)
        structured = dict(payload.get("structured_outputs") or {})
        for field in guided:
            value = payload.pop(field)
            if value is not None:
                # An explicit structured_outputs entry wins over its legacy spelling.
                structured.setdefault(GUIDED_FIELDS[field], value)
        if structured:
            payload["structured_outputs"] = structured
        return Translation(payload, changed=True)

    def classify_error(self, status: int, body: bytes) -> UpstreamStatusError:
        return normalise_error(status, body)
