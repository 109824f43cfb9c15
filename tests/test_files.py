"""OpenAI's Files API through the official SDK: upload, list, retrieve, content, delete, owned by keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.openai_schemas import OpenAISchemas
from tests.servers import Server

LINES = b"".join(
    b'{"custom_id": "line-%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n' % i
    for i in range(20)
)


def sdk(gateway: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def test_a_file_goes_up_and_comes_back(
    spawn: Callable[..., Server], simulator: Server, tmp_path: Path, schemas: OpenAISchemas
) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path / "data"))
    with sdk(gateway) as client:
        created = client.files.create(file=("batch.jsonl", LINES), purpose="batch")
        schemas.validate("OpenAIFile", created.model_dump(mode="json", exclude_unset=True))
        assert (created.bytes, created.filename, created.purpose) == (len(LINES), "batch.jsonl", "batch")
        second = client.files.create(file=("more.jsonl", b"{}\n"), purpose="batch")
        assert client.files.retrieve(created.id) == created
        assert client.files.content(created.id).read() == LINES
        listed = client.files.list()
        schemas.validate("ListFilesResponse", listed.model_dump(mode="json", exclude_unset=True))
        assert [f.id for f in listed.data] == [second.id, created.id]  # newest first, as OpenAI lists
        assert [f.id for f in client.files.list(order="asc", limit=1).data] == [created.id]
        assert [f.id for f in client.files.list(order="asc", limit=1)] == [created.id, second.id]  # paged through
        assert [f.id for f in client.files.list(order="asc", after=created.id)] == [second.id]
        deleted = client.files.delete(created.id)
        assert deleted.deleted and deleted.id == created.id
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            client.files.content(created.id)
    assert not (tmp_path / "data" / "files" / created.id).exists()


def test_files_belong_to_the_key_that_sent_them(
    spawn: Callable[..., Server], simulator: Server, tmp_path: Path
) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path), gateway_api_keys="sk-one-111,sk-two-222")
    with sdk(gateway, "sk-one-111") as one, sdk(gateway, "sk-two-222") as two:
        mine = one.files.create(file=("a.jsonl", LINES), purpose="batch")
        assert [f.id for f in one.files.list()] == [mine.id]
        assert list(two.files.list()) == []
        for attempt in (two.files.retrieve, two.files.content, two.files.delete):
            with pytest.raises(openai.NotFoundError):
                attempt(mine.id)
        assert one.files.retrieve(mine.id).id == mine.id


def test_what_cannot_be_stored_is_refused(spawn: Callable[..., Server], simulator: Server, tmp_path: Path) -> None:
    gateway = spawn("gateway", simulator.url, data_dir=str(tmp_path), batch_max_file_bytes="1000")
    url = gateway.url + "/v1/files"
    too_big = httpx.post(url, data={"purpose": "batch"}, files={"file": ("big.jsonl", b"x" * 5000)})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    wrong = httpx.post(url, data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", b"{}\n")})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    no_file = httpx.post(url, data={"purpose": "batch"})
    assert no_file.status_code == 400
    not_a_form = httpx.post(url, json={"purpose": "batch"})
    assert not_a_form.status_code == 400
    assert httpx.get(url).json()["data"] == []
    assert httpx.get(url + "?limit=0").status_code == 400
    assert httpx.post(url + "/file-nope/content").status_code == 405
