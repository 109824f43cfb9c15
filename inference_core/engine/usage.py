"""Exact usage for every stream: asked of the backend on the client's behalf, then hidden from it.

OpenAI's chat and text completions report a stream's usage only when the client sets
``stream_options.include_usage``. The gateway needs it anyway (key token counts, tpm corrections,
metrics, logs), so where the client did not ask, the engine asks for it, and takes out what the
client did not ask for: the final usage-only event, and the ``"usage":null`` OpenAI writes into
every other chunk. The client's bytes are then what they would have been without the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from inference_core import sse
from inference_core.engine.call import Outcome
from inference_core.providers.base import Payload

_ASKED = b'{"stream_options":{"include_usage":true},'
#: How OpenAI (compact) and a pretty-printing backend write a chunk's empty usage.
_NULL_USAGE = (b',"usage":null', b', "usage": null')


def asked(payload: Payload) -> bool:
    """Whether the client asked for usage itself (or for vLLM's per-chunk usage: then all is left as it is)."""
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage") or options.get("continuous_usage_stats"))


def ask(payload: Payload, raw: bytes | None) -> tuple[Payload, bytes | None]:
    """``payload`` asking for usage, and its bytes when they can be had without serialising it again."""
    options = payload.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    body = raw.lstrip() if raw is not None and "stream_options" not in payload else b""
    # A stream's body has other fields ("stream"), so a comma may follow the field put first.
    return {**payload, "stream_options": merged}, (_ASKED + body[1:] if body.startswith(b"{") else None)


async def counted(frames: AsyncIterator[bytes], outcome: Outcome, *, hide: bool) -> AsyncIterator[bytes]:
    """Relay ``frames``, counting the usage the stream reports; with ``hide``, taking it out."""
    async for frame in frames:
        if b'"usage"' in frame:  # one scan of a frame that holds none, which is nearly every frame
            for found in sse.usages(frame):
                outcome.count_usage(found)
            if hide:
                frame = _without_usage(frame)
                if not frame:
                    continue
        yield frame


def _without_usage(frames: bytes) -> bytes:
    """``frames`` without the usage-only event and without any chunk's ``usage`` field."""
    kept = []
    for event in frames.split(b"\n\n"):
        for null in _NULL_USAGE:
            event = event.replace(null, b"")
        if b'"usage"' in event and event.startswith(b"data: {"):
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                kept.append(event)
                continue
            if isinstance(chunk, dict) and "usage" in chunk:
                del chunk["usage"]
                if chunk.get("choices") == []:
                    continue
                event = b"data: " + orjson.dumps(chunk)
        kept.append(event)
    return b"\n\n".join(kept)
