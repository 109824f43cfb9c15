"""Anthropic's Messages API as vLLM serves it: a message, its stream of events, and token counts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from inference_core.simulator import generate

Body = dict[str, Any]


def _prompt_tokens(body: Body) -> int:
    return max(1, len(orjson.dumps([body.get("system"), body["messages"]])) // 4)


def count_tokens(body: Body) -> Body:
    if not isinstance(body["messages"], list):
        raise TypeError("messages must be a list")
    return {"input_tokens": _prompt_tokens(body)}


def message(body: Body) -> Body:
    if not isinstance(body["messages"], list) or not body["messages"]:
        raise ValueError("messages must be a non-empty list")
    limit = body["max_tokens"]
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 4096:
        raise ValueError("max_tokens must be an integer from 1 to 4096")
    tokens, finish = generate.text_tokens(generate.rng_for("messages", repr(body["messages"])), limit)
    return {
        "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": body["model"],
        "content": [{"type": "text", "text": "".join(tokens)}],
        "stop_reason": "end_turn" if finish == "stop" else "max_tokens", "stop_sequence": None,
        "usage": {"input_tokens": _prompt_tokens(body), "output_tokens": len(tokens)},
    }  # fmt: skip


def events(answer: Body) -> Iterator[bytes]:
    """``answer`` as Anthropic streams it: message_start, one text block's deltas, message_stop."""
    text = answer["content"][0]["text"]
    usage = answer["usage"]
    yield _event("message_start", {"message": {**answer, "content": [], "stop_reason": None,
                                               "usage": {**usage, "output_tokens": 0}}})  # fmt: skip
    yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for word in text.split(" "):
        yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word + " "}})
    yield _event("content_block_stop", {"index": 0})
    yield _event("message_delta", {"delta": {"stop_reason": answer["stop_reason"], "stop_sequence": None},
                                   "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
    yield _event("message_stop", {})


def _event(kind: str, data: Body) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"
