"""Speech to text as vLLM and OpenAI serve it: ``/v1/audio/transcriptions`` and ``/v1/audio/translations``.

The "transcript" of an upload tells how many bytes arrived, so a test can see the file came
through whole; the audio is taken to be 16 kHz 16-bit mono PCM (what Whisper listens to) for
its duration. Each backend's quirks are kept, since a gateway must relay them:

- vLLM answers ``json`` and ``text`` alike with JSON (vllm-project/vllm#49095), refuses
  ``srt`` and ``vtt``, gives ``duration`` as a string, and streams chat-like
  ``transcription.chunk``/``translation.chunk`` events ending in ``data: [DONE]``
  (``vllm/entrypoints/openai/speech_to_text/``).
- OpenAI answers ``text``, ``srt`` and ``vtt`` as plain text, and streams transcriptions as
  ``transcript.text.delta`` events and one ``transcript.text.done``, with no ``[DONE]``;
  translations do not stream.

``ValueError`` means a bad request.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import orjson

from inference_core import multipart

Form = dict[str, Any]

#: The task each route performs, named as vLLM names it.
ROUTES = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}
_BYTES_PER_SECOND = 32_000
_FRAMES_PER_SECOND = 50  # Whisper's encoder: one token per 20 ms of audio
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})  # what pydantic reads as true
_FORMATS = frozenset({"json", "text", "srt", "verbose_json", "vtt"})
_VLLM_FORMATS = frozenset({"json", "text", "verbose_json"})
_CHUNKS = {"transcribe": "transcription.chunk", "translate": "translation.chunk"}


def form(body: bytes, content_type: str) -> Form:
    """The text fields of an upload, and its ``file`` as ``{"filename", "bytes"}``.

    A field sent twice keeps its last value, as Starlette (and so vLLM) reads forms.
    """
    boundary = multipart.boundary(content_type)
    parts = multipart.parts(body, boundary) if boundary is not None else None
    if parts is None:
        raise ValueError("The body must be multipart/form-data.")
    fields: Form = {
        part.name: body[part.start : part.end].decode(errors="replace") for part in parts if part.filename is None
    }
    upload = next((part for part in reversed(parts) if part.name == "file" and part.filename is not None), None)
    if upload is None:
        raise ValueError("'file' must be an uploaded audio file.")
    fields["file"] = {"filename": upload.filename, "bytes": upload.end - upload.start}
    return fields


def streams(task: str, fields: Form, *, vllm: bool) -> bool:
    """Whether the request asks for a stream this backend sends."""
    wanted = str(fields.get("stream", "")).lower() in _TRUE
    if vllm and wanted and fields.get("response_format") == "verbose_json":
        raise ValueError("verbose_json format doesn't support streaming case")
    return wanted and (vllm or task == "transcribe")


def answer(task: str, fields: Form, *, vllm: bool) -> tuple[bytes, str]:
    """The whole answer and its media type."""
    text, size = _transcript(task, fields), fields["file"]["bytes"]
    duration = size / _BYTES_PER_SECOND
    usage = {"usage": {"type": "duration", "seconds": math.ceil(duration)}} if task == "transcribe" else {}
    kind = _format(fields, vllm=vllm)
    if kind == "verbose_json":
        segment = {
            "id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": list(text.encode()),
            "temperature": float(fields.get("temperature") or 0), "avg_logprob": -0.25, "compression_ratio": 1.0,
            "no_speech_prob": None if vllm else 0.0,
        }  # fmt: skip
        if vllm:
            verbose = {"duration": str(duration), "language": fields.get("language") or "en", "text": text,
                       "segments": [segment], "words": None}  # fmt: skip
        else:
            language = "english" if task == "translate" else fields.get("language") or "english"
            verbose = {"task": task, "language": language, "duration": duration, "text": text,
                       "segments": [segment], **usage}  # fmt: skip
        return orjson.dumps(verbose), "application/json"
    if kind == "json" or vllm:  # vLLM answers ``text`` with JSON too
        return orjson.dumps({"text": text, **usage}), "application/json"
    if kind == "srt":
        return f"1\n00:00:00,000 --> {_clock(duration, ',')}\n{text}\n\n".encode(), "text/plain"
    if kind == "vtt":
        return f"WEBVTT\n\n00:00:00.000 --> {_clock(duration, '.')}\n{text}\n\n".encode(), "text/plain"
    return text.encode(), "text/plain"


def events(task: str, fields: Form, *, vllm: bool) -> list[bytes]:
    """The stream's SSE frames, the last one ending it."""
    _format(fields, vllm=vllm)  # checked, as vLLM does, though a stream is not formatted
    text = _transcript(task, fields)
    words = [(" " if index else "") + word for index, word in enumerate(text.split(" "))]
    audio_tokens = max(1, math.ceil(fields["file"]["bytes"] / _BYTES_PER_SECOND * _FRAMES_PER_SECOND))
    if not vllm:
        usage = {"type": "tokens", "input_tokens": audio_tokens,
                 "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                 "output_tokens": len(words), "total_tokens": audio_tokens + len(words)}  # fmt: skip
        deltas = [_frame({"type": "transcript.text.delta", "delta": word}) for word in words]
        return [*deltas, _frame({"type": "transcript.text.done", "text": text, "usage": usage})]
    chunk = {"id": f"{task}-{uuid.uuid4().hex}", "object": _CHUNKS[task], "created": int(time.time()),
             "model": fields["model"]}  # fmt: skip
    frames = [_frame({**chunk, "choices": [{"delta": {"content": word}}]}) for word in words[:-1]]
    last = {"delta": {"content": words[-1]}, "finish_reason": "stop", "stop_reason": None}
    frames.append(_frame({**chunk, "choices": [last]}))
    if str(fields.get("stream_include_usage", "")).lower() in _TRUE:
        usage = {"prompt_tokens": audio_tokens, "completion_tokens": len(words),
                 "total_tokens": audio_tokens + len(words)}  # fmt: skip
        frames.append(_frame({**chunk, "choices": [], "usage": usage}))
    return [*frames, b"data: [DONE]\n\n"]


def _transcript(task: str, fields: Form) -> str:
    size = fields["file"]["bytes"]
    if task == "translate":
        return f"An English translation of {size} bytes of audio."
    return f"A transcription of {size} bytes of audio."


def _format(fields: Form, *, vllm: bool) -> str:
    kind = str(fields.get("response_format") or "json")
    if kind not in _FORMATS:
        raise ValueError(f"'response_format' must be one of {', '.join(sorted(_FORMATS))}.")
    if vllm and kind not in _VLLM_FORMATS:
        raise ValueError("Currently only support response_format: `text`, `json` or `verbose_json`")
    return kind


def _clock(seconds: float, decimal: str) -> str:
    """``seconds`` as a subtitle timestamp, ``00:01:02,345`` (SRT) or ``00:01:02.345`` (VTT)."""
    millis = round(seconds * 1000)
    return f"{millis // 3_600_000:02}:{millis // 60_000 % 60:02}:{millis // 1000 % 60:02}{decimal}{millis % 1000:03}"


def _frame(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"
