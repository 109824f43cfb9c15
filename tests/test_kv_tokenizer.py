"""PromptTokenizer: prompt token ids as vLLM computes them, from a tokenizer directory.

The tokenizers here are trained at test time on a small corpus (byte-level BPE, as the tiny test
model's; and a SentencePiece-style one whose pre-tokenizer treats the text's start specially).
Expected prompts are written out in full and encoded with the tokenizer itself, so a test fails
on any difference a replica would see. tests/vllm/test_tokenize_vllm.py compares with a real vLLM.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from inference_core.kvcache.tokenizer import PromptTokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the weather in Paris today?\n",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    'You are a helpful assistant. {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    "Grüße, café, naïve, 日本語, emoji 🙂, tabs\tand  double  spaces.\n",
]
# ChatML that loops over content parts: vLLM's "openai" content format.
CHATML = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}{{ part.text }}{% endfor %}{% endif %}"
    "{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# No loop over content: the "string" format, where text parts arrive joined by newlines.
PLAIN = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A byte-level BPE like the tiny test model's, trained in a fraction of a second."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    return bpe.to_str()


def write_dir(
    path: Path,
    tokenizer_json: str,
    *,
    template: str | list[dict[str, str]] | None = CHATML,
    bos: bool = False,
    **config: Any,
) -> Path:
    """A tokenizer directory as transformers saves one; ``bos`` adds a BOS post-processor."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    if bos:
        start = tokenizer.token_to_id("<|endoftext|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", start)]
        )
    tokenizer.save(str(path / "tokenizer.json"))
    settings = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **config}
    if template is not None:
        settings["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return path


Maker = Callable[..., PromptTokenizer]
Encode = Callable[[str], list[int]]


@pytest.fixture
def make(tmp_path: Path, bpe_json: str) -> Maker:
    """``make(**write_dir options)``: a PromptTokenizer over a fresh directory."""
    count = iter(range(1000))

    def build(**kwargs: Any) -> PromptTokenizer:
        return PromptTokenizer.load(write_dir(tmp_path / f"tok{next(count)}", bpe_json, **kwargs))

    return build


@pytest.fixture
def encode(bpe_json: str) -> Encode:
    """The tokenizer's own encoding of a text, without special tokens."""
    tokenizer = Tokenizer.from_str(bpe_json)
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
        "x-vendor": 1,
    },
}


# Chat rendering (chat_request, content_format, chat_template): what reaches the template, as vLLM builds it.


def test_chat_renders_the_template_and_encodes_the_text(make: Maker, encode: Encode) -> None:
    tok = make()
    body = chat({"role": "system", "content": "You are terse."}, user("Hi there 🙂"))
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.render(body) == expected
    assert tok.tokens(body) == encode(expected)
    assert tok.tokens(body)[0] == SPECIAL.index("<|im_start|>")


def test_generation_prompt_can_be_turned_off_but_not_through_template_kwargs(make: Maker) -> None:
    tok = make()
    turns = [user("a"), {"role": "assistant", "content": "b"}]
    closed = "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    assert tok.render(chat(*turns, add_generation_prompt=False)) == closed
    # vLLM lets the request field (true by default) override chat_template_kwargs.
    assert tok.render(chat(*turns, chat_template_kwargs={"add_generation_prompt": False})).endswith(
        "<|im_start|>assistant\n"
    )


def test_continue_final_message_leaves_the_last_message_open(make: Maker) -> None:
    tok = make()
    body = chat(user("Write"), {"role": "assistant", "content": "Once upon"}, add_generation_prompt=False)
    body["continue_final_message"] = True
    assert tok.render(body) == "<|im_start|>user\nWrite<|im_end|>\n<|im_start|>assistant\nOnce upon"
    with pytest.raises(ValueError, match="cannot both be true"):
        tok.tokens({**body, "add_generation_prompt": True})


def test_tools_are_dumped_as_vllm_models_them(make: Maker) -> None:
    tok = make()
    bare = {"type": "function", "function": {"name": "ping"}}
    text = tok.render(chat(user("hi"), tools=[WEATHER, bare]))
    lines = text.split("\n")
    # Unknown keys dropped, missing description/parameters as null, strict kept, key order vLLM's.
    assert json.loads(lines[1]) == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        },
    }
    assert lines[1].startswith('{"type": "function", "function": {"name": "get_weather", "description"')
    assert lines[2] == '{"type": "function", "function": {"name": "ping", "description": null, "parameters": null}}'


def test_tool_call_arguments_become_objects(make: Maker) -> None:
    tok = make()
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"b": 1, "a": "é"}'}},
        {"type": "function", "function": {"arguments": "not json", "name": "g"}, "id": "b"},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": "[1]"}},
    ]
    text = tok.render(chat(user("go"), {"role": "assistant", "content": None, "tool_calls": calls}))
    # Objects parsed in order; invalid JSON and non-objects become {}; tojson keeps unicode unescaped.
    assert (
        "<|im_start|>assistant\n"
        '<tool_call>{"arguments": {"b": 1, "a": "é"}, "name": "f"}</tool_call>'
        '<tool_call>{"arguments": {}, "name": "g"}</tool_call>'
        '<tool_call>{"arguments": {}, "name": "h"}</tool_call><|im_end|>\n'
    ) in text
    # Keys in the order of vLLM's validated request: id, function, type, then any others.
    whole = make(template="{{ messages[0].tool_calls | tojson }}")
    call = {"type": "function", "x": 1, "function": {"name": "f", "arguments": "{}"}, "id": "a"}
    assert whole.render(chat({"role": "assistant", "tool_calls": [call]})) == (
        '[{"id": "a", "function": {"arguments": {}, "name": "f"}, "type": "function", "x": 1}]'
    )


def test_content_parts_in_each_content_format(make: Maker) -> None:
    parts = [{"type": "text", "text": "one"}, "two", {"type": "text", "text": "three", "cache_control": {}}]
    body = chat({"role": "system", "content": parts}, {"role": "tool", "tool_call_id": "t", "content": parts[:2]})
    # A template that loops over parts gets them; tool results are joined either way.
    assert make().render(body).startswith("<|im_start|>system\nonetwothree<|im_end|>\n<|im_start|>tool\none\ntwo")
    assert make(template=PLAIN).render(body) == "system: one\ntwo\nthree\ntool: one\ntwo\nassistant:"


def test_content_format_follows_vllms_detection(make: Maker) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    macro = (
        "{% macro show(c) %}{% for p in c %}<{{ p.text }}>{% endfor %}{% endmacro %}"
        "{% for m in messages %}{{ show(m.content) }}{% endfor %}"
    )
    alias = (
        "{% for m in messages %}{% set content = m['content'] %}"
        "{% for p in content %}<{{ p.text }}>{% endfor %}{% endfor %}"
    )
    assert make(template=macro).render(chat(user(parts))) == "<a><b>"
    assert make(template=alias).render(chat(user(parts))) == "<a><b>"
    # Indexing the content without a loop is the "string" format: the template sees joined text.
    indexed = "{% for m in messages %}{{ m.content[0] }}{% endfor %}"
    assert make(template=indexed).render(chat(user(parts))) == "a"


def test_messages_as_vllm_parses_them(make: Maker) -> None:
    # The inner loop makes it the "openai" format: content arrives as parts.
    template = "{% for m in messages %}{% for part in m.content %}{% endfor %}{{ m | tojson }}\n{% endfor %}"
    tok = make(template=template)
    body = chat(
        {"role": "system", "content": "x-anthropic-billing-header: cch=42\nBe brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "q", "cache_control": {}}], "extra": 1},
        {"role": "assistant", "content": "a", "reasoning": "think", "tool_calls": []},
        {"role": "tool", "tool_call_id": "t1", "content": "r"},
    )
    lines = [json.loads(line) for line in tok.render(body).splitlines()]
    assert lines == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {}}], "name": "ann"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}],
            "reasoning": "think",
            "reasoning_content": "think",
        },
        {"role": "tool", "content": "r", "tool_call_id": "t1"},
    ]


def test_developer_messages_become_system_unless_the_template_knows_them(make: Maker) -> None:
    body = chat({"role": "system", "content": "s"}, user("u"), {"role": "developer", "content": "d"})
    assert make(template=PLAIN).render(body) == "system: s\n\nd\nuser: u\nassistant:"
    knows = PLAIN.replace("{% for m", "{# 'developer' #}{% for m")
    assert make(template=knows).render(body) == "system: s\nuser: u\ndeveloper: d\nassistant:"


def test_template_kwargs_reach_the_template_when_it_reads_them(make: Maker) -> None:
    template = "{{ flag }}|{{ enable_thinking }}|{{ reasoning_effort }}|{{ documents | tojson }}|{{ bos_token }}"
    tok = make(template=template)
    body = chat(user("x"), chat_template_kwargs={"flag": "on", "other": 1}, reasoning_effort="low")
    assert tok.render(body) == "on|True|low|null|<|endoftext|>"
    body = chat(user("x"), reasoning_effort="none", documents=[{"title": "T", "text": "body"}])
    assert tok.render(body) == '|False|none|[{"title": "T", "text": "body"}]|<|endoftext|>'
    # None and "auto" mean unset, as in vLLM's merge_kwargs.
    assert tok.render(chat(user("x"), chat_template_kwargs={"flag": "auto"})) == "|||null|<|endoftext|>"


def test_named_templates_and_template_files(tmp_path: Path, bpe_json: str) -> None:
    directory = write_dir(
        tmp_path / "named",
        bpe_json,
        template=[{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}],
    )
    tok = PromptTokenizer.load(directory)
    assert tok.render(chat(user("x"))) == "D"
    assert tok.render(chat(user("x"), tools=[WEATHER])) == "T"
    # transformers 5 saves the template as chat_template.jinja, which wins over the config.
    (directory / "chat_template.jinja").write_text("F{{ messages | length }}")
    assert PromptTokenizer.load(directory).render(chat(user("x"), tools=[WEATHER])) == "F1"


def test_jinja_environment_matches_transformers(make: Maker) -> None:
    template = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{{ {'html': '<b>&</b>'} | tojson }}{{ strftime_now('%Y')[:2] }}"
    )
    assert make(template=template).render(chat(user("hi"))) == 'hi01{"html": "<b>&</b>"}20'


def test_special_tokens_are_template_variables(make: Maker) -> None:
    tok = make(template="{{ bos_token }}{{ eos_token }}{{ image_token }}", image_token="<tool_call>")
    assert tok.render(chat(user("x"))) == "<|endoftext|><|im_end|><tool_call>"


def test_special_tokens_in_the_config_that_the_file_lacks_are_added(make: Maker, encode: Encode, bpe_json: str) -> None:
    tok = make(template="{{ bos_token }}{{ messages[0].content }}", bos_token="<s>")
    # As transformers does: "<s>" becomes one new token, not the text "<s>".
    assert tok.tokens(chat(user("hi"))) == [Tokenizer.from_str(bpe_json).get_vocab_size(), *encode("hi")]


def test_add_special_tokens_for_chat_and_completions(make: Maker, encode: Encode) -> None:
    tok = make(bos=True)
    body = chat(user("x"))
    text = tok.render(body)
    assert tok.tokens(body) == encode(text)
    assert tok.tokens({**body, "add_special_tokens": True}) == [0, *encode(text)]
    assert tok.tokens({"prompt": "def add(a, b):"}) == [0, *encode("def add(a, b):")]
    assert tok.tokens({"prompt": "def add(a, b):", "add_special_tokens": False}) == encode("def add(a, b):")


def test_completion_prompts(make: Maker, encode: Encode) -> None:
    tok = make()
    assert tok.tokens({"prompt": ["The quick brown fox"]}) == encode("The quick brown fox")
    assert tok.tokens({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tok.tokens({"prompt": [[8, 9]]}) == [8, 9]
    assert tok.tokens({"prompt": "<|im_start|>user"}) == [1, *encode("user")]


def test_ids_forwarded_by_a_prefill_replica_are_used_as_is(make: Maker, encode: Encode) -> None:
    tok = make()
    body = chat(user("x"), kv_transfer_params={"prompt_token_ids": [7, 8, 9]})
    assert tok.tokens(body) == [7, 8, 9]
    # With echo, vLLM renders the messages after all.
    assert tok.tokens({**body, "echo": True}) == encode(tok.render(body))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        tok.tokens(chat(user("x"), kv_transfer_params={"prompt_token_ids": [1, -2]}))


def test_truncation_as_vllm_truncates(make: Maker, encode: Encode) -> None:
    tok = make(bos=True)
    text = "The quick brown fox jumps over the lazy dog."
    ids = encode(text)
    # vLLM loads generative models' tokenizers truncating on the left; the tokenizer keeps BOS.
    assert tok.tokens({"prompt": text, "truncate_prompt_tokens": 4}) == [0, *ids[-3:]]
    assert tok.tokens({"prompt": text, "truncate_prompt_tokens": 4, "truncation_side": "right"}) == [0, *ids[:3]]
    assert tok.tokens({"prompt": text, "truncate_prompt_tokens": 4, "truncation_side": "left"}) == ids[-4:]
    assert tok.tokens({"prompt": [1, 2, 3, 4, 5], "truncate_prompt_tokens": 2}) == [4, 5]
    body = chat(user(text), truncate_prompt_tokens=3)
    assert tok.tokens(body) == encode(tok.render(body))[-3:]


def test_the_request_is_not_modified(make: Maker) -> None:
    body = chat(
        {"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header: a\nb"}]},
        {
            "role": "assistant",
            "content": "c",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "assistant", "content": "d"},
        add_generation_prompt=False,
        continue_final_message=True,
        tools=[WEATHER],
    )
    before = json.dumps(body)
    make().tokens(body)
    assert json.dumps(body) == before


# Errors: one clear line each.


def test_load_errors(tmp_path: Path, bpe_json: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        PromptTokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        PromptTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*tokenizer\.json"):
        PromptTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        PromptTokenizer.load(write_dir(tmp_path / "plain", bpe_json, template=None))
    with pytest.raises(ValueError, match=r"chat template, line 2: unexpected '}'"):
        PromptTokenizer.load(write_dir(tmp_path / "bad", bpe_json, template="{% for m in messages %}\n{{ m }"))


def test_load_without_the_optional_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ValueError, match=r"pip install 'inference-core\[tokenizer\]'"):
        PromptTokenizer.load(tmp_path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m"}, "no prompt"),
        ({"prompt": ""}, "no prompt"),
        ({"prompt": ["a", "b"]}, "2 prompts"),
        ({"prompt": [["a"]]}, "not text or token ids"),
        ({"prompt": [[1], [2]]}, "2 prompts"),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": []}, "empty conversation"),
        ({"messages": [{"content": "no role"}]}, "string role"),
        ({"messages": [user([{"type": "image_url", "image_url": {"url": "x"}}])]}, "'image_url' content part"),
        ({"messages": [user("x")], "chat_template": "{{ 1 }}"}, "own chat_template"),
        ({"messages": [user("x")], "tools": []}, "non-empty list"),
        ({"messages": [user("x")], "add_generation_prompt": "yes"}, "must be a boolean"),
        ({"prompt": "a", "truncate_prompt_tokens": -1}, "max_model_len"),
    ],
)
def test_requests_it_cannot_tokenize(make: Maker, body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make().tokens(body)


def test_template_errors_carry_the_templates_reason(make: Maker) -> None:
    tok = make(template="{{ raise_exception('Only user and assistant roles are supported') }}")
    with pytest.raises(ValueError, match="Only user and assistant roles are supported"):
        tok.tokens(chat(user("x")))


# Encoding (encoder): cached pieces give the ids the whole text would.


def random_text(rng: random.Random, tokens: list[str]) -> str:
    words = ["The", " quick", "  brown", "\n", "\n\n", "\t", "fox", "é", "日本", "🙂", " ", "42", "a", "", "x y"]
    return "".join(rng.choice(words + tokens * 2) for _ in range(rng.randint(0, 30)))


def test_pieces_encode_as_the_whole_text(tmp_path: Path, bpe_json: str, encode: Encode) -> None:
    # Added tokens that are prefixes of one another: the tokenizer takes the longest, leftmost.
    tokenizer = Tokenizer.from_str(bpe_json)
    tokenizer.add_tokens([AddedToken("<x>"), AddedToken("<x>y", normalized=False), AddedToken("y<", normalized=False)])
    tokenizer.add_tokens([AddedToken("<x>", normalized=False)])
    directory = write_dir(tmp_path / "prefixes", tokenizer.to_str(), bos=True)
    tok = PromptTokenizer.load(directory, cache_tokens=300)
    assert tok.caches_pieces
    whole = Tokenizer.from_file(str(directory / "tokenizer.json"))
    rng = random.Random(0)
    added = [*SPECIAL, "<x>", "<x>y", "y<"]
    for _ in range(300):
        text = random_text(rng, added) or "x"
        specials = rng.random() < 0.5
        assert (
            tok.tokens({"prompt": text, "add_special_tokens": specials})
            == whole.encode(text, add_special_tokens=specials).ids
        ), text


def metaspace_json() -> str:
    """A SentencePiece-style BPE: a "▁" is prepended to the start of the text only."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "[INST]", "[/INST]"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return tokenizer.to_str()


def test_a_tokenizer_that_treats_the_start_specially_is_encoded_whole(tmp_path: Path) -> None:
    template = "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}"
    directory = write_dir(tmp_path / "spm", metaspace_json(), template=template, bos_token="<s>")
    tok = PromptTokenizer.load(directory)
    assert not tok.caches_pieces
    whole = Tokenizer.from_file(str(directory / "tokenizer.json"))
    body = chat(user("The quick fox"), user("The lazy dog"))
    text = tok.render(body)
    assert tok.tokens(body) == tok.tokens(body) == whole.encode(text, add_special_tokens=False).ids
    # Encoding the pieces alone would put a "▁" before each message: the case the check guards.
    pieces = [whole.encode(piece, add_special_tokens=False).ids for piece in ("The quick fox", "The lazy dog")]
    inst, end = whole.token_to_id("[INST]"), whole.token_to_id("[/INST]")
    assert tok.tokens(body) != [inst, *pieces[0], end, inst, *pieces[1], end]


def test_cache_off_and_eviction_give_the_same_ids(tmp_path: Path, bpe_json: str) -> None:
    directory = write_dir(tmp_path / "d", bpe_json)
    bodies = [chat(user(f"message {i} " * (i + 1)), {"role": "assistant", "content": "ok " * i}) for i in range(30)]
    reference = [PromptTokenizer.load(directory, cache_tokens=0).tokens(body) for body in bodies]
    small = PromptTokenizer.load(directory, cache_tokens=40)
    assert [small.tokens(body) for body in bodies * 2] == reference * 2


def test_long_new_text_is_encoded_in_a_thread(make: Maker, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = make()
    threaded: list[object] = []
    real = asyncio.to_thread

    async def to_thread(fn: Any, /, *args: Any) -> Any:
        threaded.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    long = chat(user("The quick brown fox jumps. " * 40))
    assert asyncio.run(tok.tokens_async(chat(user("short")))) == tok.tokens(chat(user("short")))
    assert threaded == []
    assert asyncio.run(tok.tokens_async(long)) == tok.tokens(long)
    assert len(threaded) == 1
    # Seen before: its pieces are cached, nothing is left to encode.
    asyncio.run(tok.tokens_async(long))
    assert len(threaded) == 1


def test_a_4000_token_chat_is_fast_once_its_turns_were_seen(make: Maker) -> None:
    """Timings (``pytest -s`` prints them); the bound is loose, the measured p99 is far below it."""
    tok = make()
    text = "".join(CORPUS) * 40
    messages = [{"role": "user" if i % 2 else "assistant", "content": text[i * 700 : (i + 1) * 700]} for i in range(24)]
    body = chat({"role": "system", "content": text[-2000:]}, *messages)
    assert 3000 < len(tok.tokens(body)) < 6000
    samples = []
    for _ in range(300):
        started = time.perf_counter()
        tok.tokens(body)
        samples.append(time.perf_counter() - started)
    samples.sort()
    p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
    print(f"\n{len(tok.tokens(body))}-token chat, pieces cached: p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs")
    assert p50 < 0.002
