"""OpenAI's Responses API as the simulator answers it, with responses stored in this process only.

Like vLLM (``VLLM_ENABLE_RESPONSES_API_STORE=1``), each server keeps the responses it created
in its own memory: a ``previous_response_id`` it did not create is answered 404, which is what
a balancer that ignores where a response lives runs into.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from inference_core.simulator import generate

Body = dict[str, Any]


class Unknown(LookupError):
    """No stored response has this id."""


class ResponseStore:
    def __init__(self) -> None:
        self._responses: dict[str, Body] = {}
        self._inputs: dict[str, list[Body]] = {}

    def create(self, body: Body, limit: int) -> Body:
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self._responses:
            raise Unknown(previous)
        text_input = body.get("input")
        items = [{"type": "message", "role": "user", "content": text_input}] if isinstance(text_input, str) else []
        if isinstance(text_input, list):
            items = [item for item in text_input if isinstance(item, dict)]
        tokens, finish = generate.text_tokens(generate.rng_for("responses", previous, repr(text_input)), limit)
        text = "".join(tokens)
        ident = f"resp_{uuid.uuid4().hex}"
        response = {
            "id": ident, "object": "response", "created_at": int(time.time()), "model": body["model"],
            "status": "completed" if finish == "stop" else "incomplete", "previous_response_id": previous,
            "output": [{
                "type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }],
            "usage": {"input_tokens": max(1, len(repr(text_input)) // 4), "output_tokens": len(tokens),
                      "total_tokens": max(1, len(repr(text_input)) // 4) + len(tokens)},
        }  # fmt: skip
        if body.get("store", True):
            self._responses[ident] = response
            self._inputs[ident] = [{"id": f"msg_{uuid.uuid4().hex}", **item} for item in items]
        return response

    def events(self, response: Body) -> Iterator[bytes]:
        """The stream of ``response`` in the order OpenAI sends it: created, the item, its text, completed."""
        message = response["output"][0]
        part = message["content"][0]
        text = part["text"]
        where = {"output_index": 0, "item_id": message["id"], "content_index": 0}
        yield _event("response.created", {"response": {**response, "status": "in_progress", "output": []}})
        yield _event("response.output_item.added", {"output_index": 0, "item": {**message, "content": []}})
        yield _event("response.content_part.added", {**where, "part": {**part, "text": ""}})
        for word in text.split(" "):
            yield _event("response.output_text.delta", {**where, "delta": word + " ", "logprobs": []})
        yield _event("response.output_text.done", {**where, "text": text, "logprobs": []})
        yield _event("response.content_part.done", {**where, "part": part})
        yield _event("response.output_item.done", {"output_index": 0, "item": message})
        yield _event("response.completed", {"response": response})

    def get(self, ident: str) -> Body:
        if ident not in self._responses:
            raise Unknown(ident)
        return self._responses[ident]

    def delete(self, ident: str) -> Body:
        self.get(ident)
        del self._responses[ident], self._inputs[ident]
        return {"id": ident, "object": "response", "deleted": True}

    def cancel(self, ident: str) -> Body:
        return {**self.get(ident), "status": "cancelled"}

    def input_items(self, ident: str) -> Body:
        self.get(ident)
        items = self._inputs[ident]
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}  # fmt: skip


_SEQUENCE = iter(range(1 << 62))


def _event(kind: str, data: Body) -> bytes:
    payload = orjson.dumps({"type": kind, "sequence_number": next(_SEQUENCE), **data})
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
