"""Server-sent events as OpenAI uses them: ``data: <json>\\n\\n`` frames ending in ``data: [DONE]``.

The gateway relays upstream frames without parsing them; it only needs to cut the byte stream
at frame boundaries (so an in-band error never lands inside a half-sent frame) and to notice a
stream that stopped before ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from inference_core.errors import BadUpstreamResponse

DONE = b"data: [DONE]\n\n"
#: What the last event of a complete stream holds: OpenAI's chat and text completions.
DONE_MARKERS = (b"data: [DONE]",)
_SEPARATORS = (b"\n\n", b"\r\n\r\n")


def frame(data: bytes) -> bytes:
    """One event carrying ``data`` (a single-line JSON document)."""
    return b"data: " + data + b"\n\n"


def usages(frames: bytes) -> list[dict[str, object]]:
    """The ``usage`` objects the events in ``frames`` carry, in order.

    Chat and text completions carry it at the top of their last chunk; Anthropic's Messages API
    in ``message_start``'s message and then in ``message_delta``; the Responses API in
    ``response.completed``'s response. Only frames that contain a non-null usage are parsed.
    """
    if b'"usage":{' not in frames and b'"usage": {' not in frames:
        return []
    found = []
    for event in frames.split(b"\n\n"):
        start = event.find(b"data: {")
        if start < 0 or b'"usage"' not in event:
            continue
        try:
            data = orjson.loads(event[start + 6 :])
        except orjson.JSONDecodeError:
            continue
        for holder in (data, data.get("message"), data.get("response")) if isinstance(data, dict) else ():
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict) and usage:
                found.append(usage)
                break
    return found


def created_response_id(frames: bytes) -> str | None:
    """The id of the response a Responses API ``response.created`` event in ``frames`` announces."""
    for event in frames.split(b"\n\n"):
        if b"response.created" not in event:
            continue
        for line in event.splitlines():
            if line.startswith(b"data:"):
                try:
                    response = orjson.loads(line[5:]).get("response")
                except (orjson.JSONDecodeError, AttributeError):
                    return None
                found = response.get("id") if isinstance(response, dict) else None
                return found if isinstance(found, str) else None
    return None


def _last_boundary(buffer: bytes) -> int:
    """Index just past the last complete frame in ``buffer``, or 0."""
    return max(
        (index + len(separator) for separator in _SEPARATORS if (index := buffer.rfind(separator)) >= 0),
        default=0,
    )


async def whole_frames(chunks: AsyncIterator[bytes], ends: tuple[bytes, ...] = DONE_MARKERS) -> AsyncIterator[bytes]:
    """Re-cut ``chunks`` so that every piece ends at a frame boundary.

    Raises ``BadUpstreamResponse`` when the upstream stops before an event holding one of
    ``ends`` (``data: [DONE]``, or the Responses API's ``response.completed``...): a client must
    never take a truncated answer for a complete one.
    """
    pending = b""
    last = b""
    async for chunk in chunks:
        if not pending and chunk.endswith(b"\n\n"):  # the usual case: whole frames, passed on as they are
            last = chunk
            yield chunk
            continue
        pending += chunk
        cut = _last_boundary(pending)
        if cut:
            ready, pending = pending[:cut], pending[cut:]
            last = ready
            yield ready
    final = last.rstrip().rsplit(b"\n\n", 1)[-1]
    if pending.strip() or not any(marker in final for marker in ends):
        raise BadUpstreamResponse("The backend's stream ended before it was complete.")
