"""The simulator's speech to text, called directly with the official SDK and httpx, as vLLM and as OpenAI."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import sim_stats
from tests.openai_schemas import OpenAISchemas
from tests.servers import Server, start_simulator

WHISPER = "openai/whisper-large-v3"
#: Bytes that look like multipart framing, so a parser that cut the file short would show.
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt \r\n--\r\n\r\n" + bytes(range(256)) * 40


@pytest.fixture(scope="module")
def vllm_sim(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir, "--model", WHISPER)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_sim(log_dir: Path) -> Iterator[Server]:
    server = start_simulator(log_dir, "--mode", "openai", "--model", "whisper-1")
    yield server
    server.stop()


@pytest.fixture
def vllm_sdk(vllm_sim: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vllm_sim.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def openai_sdk(openai_sim: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=openai_sim.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _post(server: Server, path: str = "/v1/audio/transcriptions", **fields: str) -> httpx.Response:
    return httpx.post(server.url + path, data=fields, files={"file": ("a.wav", AUDIO)}, timeout=30)


def _events(response: httpx.Response) -> list[bytes]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [frame for frame in response.content.split(b"\n\n") if frame]


def _translate(sdk: openai.OpenAI, **options: Any) -> Any:
    with warnings.catch_warnings():  # the SDK marks translations deprecated; they are still served
        warnings.simplefilter("ignore", DeprecationWarning)
        return sdk.audio.translations.create(file=("a.wav", AUDIO), **options)


# As vLLM.


def test_vllm_transcribes_the_whole_upload(vllm_sdk: openai.OpenAI) -> None:
    result = vllm_sdk.audio.transcriptions.create(model=WHISPER, file=("a.wav", AUDIO), language="en")
    assert result.text == f"A transcription of {len(AUDIO)} bytes of audio."
    assert result.usage is not None and result.usage.model_dump() == {"type": "duration", "seconds": 1}


def test_vllm_translates(vllm_sdk: openai.OpenAI) -> None:
    assert _translate(vllm_sdk, model=WHISPER).text == f"An English translation of {len(AUDIO)} bytes of audio."


def test_vllm_answers_text_with_json_as_vllm_does(vllm_sim: Server) -> None:
    # vllm-project/vllm#49095: response_format=text still gets the JSON object.
    response = _post(vllm_sim, model=WHISPER, response_format="text")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"text": f"A transcription of {len(AUDIO)} bytes of audio.",
                               "usage": {"type": "duration", "seconds": 1}}  # fmt: skip
    assert _post(vllm_sim, "/v1/audio/translations", model=WHISPER).json() == {
        "text": f"An English translation of {len(AUDIO)} bytes of audio."
    }


def test_vllm_verbose_json_has_a_string_duration(vllm_sim: Server) -> None:
    body = _post(vllm_sim, model=WHISPER, response_format="verbose_json", language="de").json()
    assert body["duration"] == str(len(AUDIO) / 32000)
    assert body["language"] == "de"
    assert body["words"] is None
    (segment,) = body["segments"]
    assert segment["text"] == body["text"] and segment["no_speech_prob"] is None


@pytest.mark.parametrize("response_format", ["srt", "vtt", "xml"])
def test_vllm_refuses_subtitles(vllm_sim: Server, response_format: str) -> None:
    response = _post(vllm_sim, model=WHISPER, response_format=response_format)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"


def test_vllm_streams_transcription_chunks_then_done(vllm_sim: Server, vllm_sdk: openai.OpenAI) -> None:
    frames = _events(_post(vllm_sim, model=WHISPER, stream="true"))
    assert frames[-1] == b"data: [DONE]"
    chunks = [orjson.loads(frame.removeprefix(b"data: ")) for frame in frames[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"transcription.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("transcribe-")
    assert {chunk["model"] for chunk in chunks} == {WHISPER}
    assert chunks[0]["choices"] == [{"delta": {"content": "A"}}]
    assert chunks[-1]["choices"][0] == {"delta": {"content": " audio."}, "finish_reason": "stop", "stop_reason": None}
    text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)
    assert text == f"A transcription of {len(AUDIO)} bytes of audio."

    # The SDK types these as OpenAI's events; vLLM's chunks come through as extra fields.
    stream: Any = vllm_sdk.audio.transcriptions.create(model=WHISPER, file=("a.wav", AUDIO), stream=True)
    assert "".join(event.choices[0]["delta"]["content"] for event in stream) == text


def test_vllm_streams_translations_with_usage_on_request(vllm_sim: Server) -> None:
    response = _post(vllm_sim, "/v1/audio/translations", model=WHISPER, stream="true", stream_include_usage="true")
    frames = _events(response)
    assert frames[-1] == b"data: [DONE]"
    chunks = [orjson.loads(frame.removeprefix(b"data: ")) for frame in frames[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"translation.chunk"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(chunks) - 1


def test_vllm_does_not_stream_verbose_json(vllm_sim: Server) -> None:
    response = _post(vllm_sim, model=WHISPER, stream="true", response_format="verbose_json")
    assert response.status_code == 400
    assert "streaming" in response.json()["error"]["message"]


def test_vllm_serves_its_model_when_none_is_named(vllm_sim: Server) -> None:
    assert _post(vllm_sim).json()["text"].startswith("A transcription of")


# As OpenAI.


def test_openai_transcribes_with_the_official_schema(openai_sdk: openai.OpenAI, schemas: OpenAISchemas) -> None:
    result = openai_sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO))
    assert result.text == f"A transcription of {len(AUDIO)} bytes of audio."
    schemas.validate("CreateTranscriptionResponseJson", result.model_dump(exclude_none=True))
    verbose: Any = openai_sdk.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", AUDIO), response_format="verbose_json"
    )
    assert (verbose.task, verbose.language, verbose.text) == ("transcribe", "english", result.text)
    schemas.validate("CreateTranscriptionResponseVerboseJson", verbose.model_dump(exclude_none=True))


def test_openai_translates_with_the_official_schema(openai_sdk: openai.OpenAI, schemas: OpenAISchemas) -> None:
    result = _translate(openai_sdk, model="whisper-1")
    assert result.text == f"An English translation of {len(AUDIO)} bytes of audio."
    schemas.validate("CreateTranslationResponseJson", result.model_dump(exclude_none=True))
    verbose = _translate(openai_sdk, model="whisper-1", response_format="verbose_json")
    schemas.validate("CreateTranslationResponseVerboseJson", verbose.model_dump(exclude_none=True))


def test_openai_answers_text_and_subtitles_as_plain_text(openai_sdk: openai.OpenAI, openai_sim: Server) -> None:
    text = f"A transcription of {len(AUDIO)} bytes of audio."
    create = openai_sdk.audio.transcriptions.create
    assert create(model="whisper-1", file=("a.wav", AUDIO), response_format="text") == text
    assert create(model="whisper-1", file=("a.wav", AUDIO), response_format="srt") == (
        f"1\n00:00:00,000 --> 00:00:00,321\n{text}\n\n"
    )
    assert create(model="whisper-1", file=("a.wav", AUDIO), response_format="vtt") == (
        f"WEBVTT\n\n00:00:00.000 --> 00:00:00.321\n{text}\n\n"
    )
    assert _post(openai_sim, model="whisper-1", response_format="text").headers["content-type"].startswith("text/plain")


def test_openai_streams_text_deltas_and_done(openai_sdk: openai.OpenAI, schemas: OpenAISchemas) -> None:
    events: list[Any] = list(
        openai_sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO), stream=True)
    )
    for event in events:
        schemas.validate("CreateTranscriptionResponseStreamEvent", event.model_dump(exclude_none=True))
    *deltas, done = events
    assert {event.type for event in deltas} == {"transcript.text.delta"}
    assert done.type == "transcript.text.done"
    assert "".join(event.delta for event in deltas) == done.text == f"A transcription of {len(AUDIO)} bytes of audio."


def test_openai_stream_has_no_done_marker(openai_sim: Server) -> None:
    frames = _events(_post(openai_sim, model="whisper-1", stream="true"))
    assert b"[DONE]" not in b"".join(frames)
    assert orjson.loads(frames[-1].removeprefix(b"data: "))["type"] == "transcript.text.done"


def test_openai_requires_a_model(openai_sim: Server) -> None:
    response = _post(openai_sim)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


# Either way.


@pytest.mark.parametrize("mode", ["vllm", "openai"])
def test_an_unknown_model_is_404_in_the_backends_shape(mode: str, request: pytest.FixtureRequest) -> None:
    sdk: openai.OpenAI = request.getfixturevalue(f"{mode}_sdk")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.audio.transcriptions.create(model="no-such-model", file=("a.wav", AUDIO))
    error = caught.value.body
    assert isinstance(error, dict) and "no-such-model" in error["message"]
    assert error["type"] == ("NotFoundError" if mode == "vllm" else "invalid_request_error")


@pytest.mark.parametrize("mode", ["vllm", "openai"])
def test_what_is_not_an_upload_is_400(mode: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(f"{mode}_sim")
    url = server.url + "/v1/audio/transcriptions"
    not_multipart = httpx.post(url, json={"model": WHISPER})
    no_file = httpx.post(url, data={"model": WHISPER}, files={"other": ("a.wav", AUDIO)})
    file_as_text = httpx.post(url, data={"model": WHISPER, "file": "not a file"}, files={"x": ("a", b"")})
    whole = httpx.Request("POST", url, data={"model": WHISPER}, files={"file": ("a.wav", AUDIO)})
    truncated = httpx.post(url, content=whole.read()[:-10], headers={"content-type": whole.headers["content-type"]})
    for response in (not_multipart, no_file, file_as_text, truncated):
        assert response.status_code == 400, response.text
        assert "error" in response.json()


def test_a_large_upload_arrives_whole(vllm_sim: Server) -> None:
    size = 5 * 1024 * 1024 + 7
    response = httpx.post(vllm_sim.url + "/v1/audio/transcriptions", files={"file": ("a.wav", b"\r\n--" * (size // 4))})
    assert response.json()["text"] == f"A transcription of {size // 4 * 4} bytes of audio."


def test_the_stats_show_the_form_as_received(vllm_sim: Server) -> None:
    _post(vllm_sim, model=WHISPER, language="fr", prompt="Bonjour")
    assert sim_stats(vllm_sim)["last_body"] == {"model": WHISPER, "language": "fr", "prompt": "Bonjour",
                                            "file": {"filename": "a.wav", "bytes": len(AUDIO)}}  # fmt: skip


# Faults, asked for by header or by form field.


@pytest.mark.parametrize("how", ["header", "field"])
def test_a_status_fault(vllm_sim: Server, how: str) -> None:
    fault = "status=503,retry_after=1"
    if how == "header":
        response = httpx.post(vllm_sim.url + "/v1/audio/transcriptions", data={"model": WHISPER},
                              files={"file": ("a.wav", AUDIO)}, headers={"x-sim-fault": fault})  # fmt: skip
    else:
        response = _post(vllm_sim, model=WHISPER, sim_fault=fault)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


def test_stream_faults(vllm_sim: Server, openai_sim: Server) -> None:
    assert b"[DONE]" not in b"".join(_events(_post(vllm_sim, model=WHISPER, stream="true", sim_fault="no_done")))
    cut = _events(_post(openai_sim, model="whisper-1", stream="true", sim_fault="no_done"))
    assert all(b"transcript.text.delta" in frame for frame in cut)
    with pytest.raises(httpx.RemoteProtocolError):
        _post(vllm_sim, model=WHISPER, stream="true", sim_fault="reset_after=2")
