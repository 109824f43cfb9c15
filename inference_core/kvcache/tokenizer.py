"""A request's prompt token ids, exactly as a vLLM 0.32 replica computes them, without transformers.

Cache-aware routing hashes blocks of the prompt's token ids, so the ids must be vLLM's to the
last token: the same chat template rendered with the same variables (``chat_template``), the
same text encoded the same way (``encoder``), from the same files of a Hugging Face tokenizer
directory (``tokenizer_files``). This module ties them together for a text-only model as vLLM's
serving path does:

- ``entrypoints/openai/chat_completion/protocol.py`` ``build_tok_params`` and
  ``renderers/params.py`` ``TokenizeParams``: ``add_special_tokens`` false by default for chat
  and true for completions, ``truncate_prompt_tokens`` and ``truncation_side``
  (``get_encode_kwargs``: the tokenizer truncates unless a side is given; then ids are cut);
- ``renderers/online_renderer.py`` ``_reused_prompt_token_ids``: the ids a prefill replica
  forwarded to a disaggregated decode replica;
- ``renderers/inputs/preprocess.py`` ``prompt_to_seq``: a completions prompt as text or ids.

Not mirrored: media content, prompt embeddings, fill-in-the-middle ``suffix``, several prompts in
one request. Anything this cannot compute raises ``ValueError``.

Rendering and looking pieces up run where they are called; encoding new text, the expensive
part, moves to a worker thread in ``tokens_async`` when there is enough of it to pay for the hop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inference_core.kvcache.chat_request import flag, has_media
from inference_core.kvcache.encoder import TRUNCATION_SIDE, Pending, truncate
from inference_core.kvcache.tokenizer_files import read_json, read_tokenizer, special_tokens, template_sources

if TYPE_CHECKING:
    from inference_core.kvcache.chat_template import ChatTemplates
    from inference_core.kvcache.encoder import Encoder

__all__ = ["PromptTokenizer"]

#: Cached token ids, summed over pieces: about 25 MB when full (8 bytes an id, about 4 of text).
DEFAULT_CACHE_TOKENS = 1 << 21
#: New text up to this many characters is encoded on the event loop: encoding it takes about
#: what a hop to a worker thread does (about 90 µs against 80 µs, with the test model's tokenizer).
#: Longer text is encoded in a thread, where the Rust tokenizer runs without the GIL.
INLINE_CHARS = 512
#: Rendering and splitting are Python (about 8 µs per message or per 1,000 characters) and hold
#: the GIL wherever they run; a thread only lets the loop back in every switch interval (5 ms),
#: so a request goes there whole only when it would hold the loop longer than that.
INLINE_PAYLOAD_CHARS = 512 * 1024


@dataclass(frozen=True)
class _Truncation:
    """``truncate_prompt_tokens`` and ``truncation_side`` of a request (params.TokenizeParams)."""

    tokens: int
    side: Literal["left", "right"] | None


class PromptTokenizer:
    """Prompt token ids for OpenAI request bodies, as a vLLM replica serving one model computes them.

    One instance can be shared by the event loop and worker threads.
    """

    def __init__(self, encoder: Encoder, templates: ChatTemplates) -> None:
        self._encoder = encoder
        self._templates = templates

    @classmethod
    def load(cls, directory: str | Path, *, cache_tokens: int = DEFAULT_CACHE_TOKENS) -> PromptTokenizer:
        """Read a model's tokenizer directory; ``ValueError`` says in one line what is wrong with it.

        ``cache_tokens`` bounds the cache of encoded pieces (0 turns it off).
        """
        try:
            import jinja2  # noqa: F401
            import tokenizers  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"tokenizing prompts needs the `tokenizers` and `jinja2` packages ({exc.name} is missing): "
                "pip install 'inference-core[tokenizer]'"
            ) from None
        # Imported once the optional packages they need are known to be there.
        from inference_core.kvcache.chat_template import ChatTemplates, compile_templates
        from inference_core.kvcache.encoder import Encoder

        path = Path(directory).expanduser()
        if not path.is_dir():
            raise ValueError(f"tokenizer directory {path} does not exist")
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer directory {path} has no tokenizer.json")
        config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        tokenizer = read_tokenizer(path)
        templates = compile_templates(template_sources(path, config))
        variables, extra = special_tokens(path, config)
        encoder = Encoder(
            tokenizer, config=config, special_tokens=[*variables.values(), *extra], cache_tokens=cache_tokens
        )
        return cls(encoder, ChatTemplates(templates, variables))

    @property
    def caches_pieces(self) -> bool:
        """Whether the text between added tokens is cached on its own (else whole prompts are)."""
        return self._encoder.caches_pieces

    def tokens(self, payload: Mapping[str, Any]) -> list[int]:
        """The prompt token ids of a chat completions (``messages``) or completions (``prompt``) body."""
        return self._finish(*self._prepare(payload))

    async def tokens_async(self, payload: Mapping[str, Any]) -> list[int]:
        """``tokens``, encoding long new text in a worker thread so the event loop stays free."""
        if _payload_chars(payload) > INLINE_PAYLOAD_CHARS:
            return await asyncio.to_thread(self.tokens, payload)
        pending, truncation = self._prepare(payload)
        if pending.new_chars <= INLINE_CHARS:
            return self._finish(pending, truncation)
        return await asyncio.to_thread(self._finish, pending, truncation)

    def render(self, payload: Mapping[str, Any]) -> str:
        """The text a chat completions body's template renders to: what vLLM then encodes."""
        text, _ = self._templates.render(payload)
        return text

    def _prepare(self, payload: Mapping[str, Any]) -> tuple[Pending, _Truncation | None]:
        """The prompt's pieces, and the truncation left to apply to its ids."""
        truncation = _truncation(payload)
        if "messages" in payload:
            forwarded = _forwarded_ids(payload)
            if forwarded is not None:
                return Pending([tuple(forwarded)]), None
            text, tokenize = self._templates.render(payload)
            if tokenize:
                # A template asked to tokenize (chat_template_kwargs): vLLM gets ids, which it only truncates.
                return self._encoder.pending(text, add_special_tokens=False), truncation
            return self._text(text, flag(payload, "add_special_tokens", False), truncation)
        if payload.get("prompt_embeds") is not None:
            raise ValueError("cannot tokenize prompt_embeds")
        if payload.get("suffix") is not None:
            raise ValueError("suffix is only supported by models with fill-in-the-middle rendering")
        prompt = _single_prompt(payload.get("prompt"))
        if isinstance(prompt, list):
            return Pending([tuple(prompt)]), truncation
        return self._text(prompt, flag(payload, "add_special_tokens", True), truncation)

    def _text(
        self, text: str, add_special_tokens: bool, truncation: _Truncation | None
    ) -> tuple[Pending, _Truncation | None]:
        """vLLM's get_encode_kwargs: the tokenizer truncates, unless a side is asked for; then ids are cut."""
        if truncation is not None and truncation.side is None:
            return self._encoder.pending(
                text, add_special_tokens=add_special_tokens, truncation=truncation.tokens
            ), None
        return self._encoder.pending(text, add_special_tokens=add_special_tokens), truncation

    def _finish(self, pending: Pending, truncation: _Truncation | None) -> list[int]:
        ids = self._encoder.finish(pending)
        if truncation is None:
            return ids
        return truncate(ids, truncation.tokens, truncation.side or TRUNCATION_SIDE)


def _truncation(payload: Mapping[str, Any]) -> _Truncation | None:
    tokens = payload.get("truncate_prompt_tokens")
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < -1:
        raise ValueError("truncate_prompt_tokens must be an integer >= -1")
    if tokens == -1:
        raise ValueError("truncate_prompt_tokens=-1 depends on the replica's max_model_len")
    side = payload.get("truncation_side")
    if side not in (None, "left", "right"):
        raise ValueError("truncation_side must be 'left' or 'right'")
    return _Truncation(tokens, side)


def _single_prompt(prompt: object) -> str | list[int]:
    """A completions prompt: one string or one list of ids (renderers/inputs/preprocess.prompt_to_seq)."""
    if isinstance(prompt, list) and len(prompt) > 1 and not all(_is_token_id(item) for item in prompt):
        raise ValueError(f"the request has {len(prompt)} prompts; only one can be tokenized")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_token_id(item) for item in prompt):
        return list(prompt)
    raise ValueError("the request has no prompt to tokenize" if not prompt else "the prompt is not text or token ids")


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _forwarded_ids(payload: Mapping[str, Any]) -> list[int] | None:
    """online_renderer._reused_prompt_token_ids: a disaggregated decode replica takes the prefill's ids."""
    params = payload.get("kv_transfer_params")
    if not isinstance(params, dict) or params.get("prompt_token_ids") is None or payload.get("echo"):
        return None
    if any(has_media(message) for message in payload.get("messages") or ()):
        return None  # vLLM renders such messages instead
    ids = params["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(_is_token_id(item) for item in ids):
        raise ValueError("kv_transfer_params.prompt_token_ids must be a non-empty list of token ids")
    return ids


def _payload_chars(payload: Mapping[str, Any]) -> int:
    """About how much text a request carries, without rendering it."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in payload.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(
                len(part["text"]) for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return total
