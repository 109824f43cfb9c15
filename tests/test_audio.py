"""Speech to text through the gateway: uploads relayed whole, routed by the form's model, streams relayed."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import sim_stats
from tests.servers import Server, start_gateway, start_simulator

WHISPER = "openai/whisper-large-v3"
#: Bytes that look like multipart framing, so a gateway that cut or re-encoded the file would show.
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt \r\n--\r\n\r\n" + bytes(range(256)) * 40


@pytest.fixture(scope="module")
def whisper(log_dir: Path) -> Iterator[tuple[Server, Server]]:
    """A vLLM-mode simulator serving Whisper, and a gateway in front of it with a small body limit."""
    simulator = start_simulator(log_dir, "--model", WHISPER)
    gateway = start_gateway(log_dir, simulator.url, model=WHISPER, max_body_bytes="100000")
    yield simulator, gateway
    gateway.stop()
    simulator.stop()


@pytest.fixture
def sdk(whisper: tuple[Server, Server]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=whisper[1].url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_a_transcription_arrives_whole_and_comes_back(sdk: openai.OpenAI, whisper: tuple[Server, Server]) -> None:
    raw = sdk.audio.transcriptions.with_raw_response.create(model=WHISPER, file=("speech.wav", AUDIO), language="en")
    assert f"{len(AUDIO)} bytes" in raw.parse().text
    assert raw.headers["x-inference-backend"] == "default"
    form = sim_stats(whisper[0])["last_body"]
    assert form["file"] == {"filename": "speech.wav", "bytes": len(AUDIO)} and form["language"] == "en"


def test_a_translation(sdk: openai.OpenAI) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks this API deprecated
        text = sdk.audio.translations.create(model=WHISPER, file=("speech.wav", AUDIO)).text
    assert text == f"An English translation of {len(AUDIO)} bytes of audio."


def test_a_streamed_transcription_is_relayed_event_by_event(whisper: tuple[Server, Server]) -> None:
    form = {"model": WHISPER, "stream": "true"}
    url = whisper[1].url + "/v1/audio/transcriptions"
    with httpx.stream("POST", url, data=form, files={"file": ("a.wav", AUDIO)}, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    assert all('"transcription.chunk"' in event for event in events[:-1])


def test_an_upload_over_the_body_limit_is_413(whisper: tuple[Server, Server]) -> None:
    url = whisper[1].url + "/v1/audio/transcriptions"
    response = httpx.post(url, data={"model": WHISPER}, files={"file": ("a.wav", bytes(150_000))})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert sim_stats(whisper[0])["requests"]["/v1/audio/transcriptions"] < 100  # never sent upstream


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"json": {"model": WHISPER}}, "multipart/form-data"),
        ({"files": {"file": ("a.wav", AUDIO)}}, "'model'"),
        ({"data": {"model": ""}, "files": {"file": ("a.wav", AUDIO)}}, "'model'"),
    ],
)
def test_what_is_not_a_usable_upload_is_400(
    whisper: tuple[Server, Server], kwargs: dict[str, object], message: str
) -> None:
    response = httpx.post(whisper[1].url + "/v1/audio/transcriptions", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_an_openai_backend_streams_its_own_events(spawn: Callable[..., Server]) -> None:
    simulator = spawn("simulator", "--mode", "openai", "--model", "whisper-1")
    gateway = spawn("gateway", simulator.url, provider_type="openai", model="whisper-1")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO), stream=True))
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == "".join(event.delta for event in events[:-1] if event.type == "transcript.text.delta")
