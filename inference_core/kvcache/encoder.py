"""Text to token ids with Hugging Face's Rust tokenizer, as transformers 5 encodes, caching pieces.

The tokenizer is set up as transformers' ``TokenizersBackend`` sets it up: ``tokenizer.json``
as is, special tokens of the config added when the file lacks them, ``split_special_tokens``,
no truncation or padding baked into the file (transformers truncates per call, on the side vLLM
loads a generative model's tokenizer with). Not mirrored: the model-specific tokenizer classes
with which transformers 5 rebuilds a pipeline instead of reading ``tokenizer.json``, and
Mistral's and Harmony's (gpt-oss) tokenizers.

Encoding is the expensive part (a few ms for 4,000 tokens), and conversations repeat: each turn
resends the previous ones. The tokenizer cuts the text at added tokens (the special tokens
templates put around each message) before anything else; each piece between two is normalized,
pre-tokenized and encoded alone, so a piece's ids do not depend on its neighbours, and the
pieces' ids are cached so that only new text is encoded. Two things could still make them
depend on a piece's position, and either turns piece caching off (whole texts are cached
instead): added tokens that match only after normalization or eat the whitespace beside them
(``normalized``, ``lstrip``, ``rstrip``, ``single_word``), and pre-tokenizers that treat the
text's first piece differently (``Metaspace`` with ``prepend_scheme: first``) or are not known
to be piecewise. The special tokens a post-processor adds (BOS...) are found by probing and put
around the concatenation. A probe at load checks the pieces against a whole encoding.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from inference_core.kvcache.tokenizer_files import token_text

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

#: vLLM loads a generative model's tokenizer with this side, whatever its config says (tokenizers/registry.py).
TRUNCATION_SIDE: Literal["left", "right"] = "left"
# Pre-tokenizers that treat each piece alike wherever it sits in the text.
_PIECEWISE_PRE_TOKENIZERS = frozenset({
    "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Digits", "Metaspace", "Punctuation", "Sequence",
    "Split", "UnicodeScripts", "Whitespace", "WhitespaceSplit"
})  # fmt: skip
_AFFIX_POST_PROCESSORS = frozenset(
    {"BertProcessing", "ByteLevel", "RobertaProcessing", "Sequence", "TemplateProcessing"}
)


@dataclass
class Pending:
    """A prompt cut into pieces: ids already known (added tokens, cached text, given ids) or text to encode."""

    pieces: list[str | tuple[int, ...]]
    add_special_tokens: bool = False
    #: ``truncate_prompt_tokens`` applied by the tokenizer, which leaves room for the special tokens.
    truncation: int | None = None

    @property
    def new_chars(self) -> int:
        return sum(len(piece) for piece in self.pieces if isinstance(piece, str))


def truncate(ids: list[int], count: int, side: Literal["left", "right"]) -> list[int]:
    """Keep ``count`` ids from one side (transformers' and params.TokenizeParams._token_truncation)."""
    if count >= len(ids):
        return ids
    return ids[len(ids) - count :] if side == "left" else ids[:count]


class Encoder:
    """A tokenizer set up as transformers does, encoding prompts in two steps: ``pending``, then ``finish``.

    ``pending`` looks the pieces up (cheap, fine on the event loop); ``finish`` encodes the new
    ones, in a batch that releases the GIL. One instance can be shared by threads.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, config: Mapping[str, Any], special_tokens: Sequence[object], cache_tokens: int
    ) -> None:
        """Take over ``tokenizer``; ``special_tokens`` are those of the config, as strings or AddedTokens."""
        _add_missing_tokens(tokenizer, config, special_tokens)
        # transformers sets the tokenizer up per call: vLLM asks for no padding, and for truncation
        # only at a length it rejects anyway.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._tokenizer = tokenizer
        self._capacity = max(cache_tokens, 0)
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()
        described = json.loads(tokenizer.to_str())
        decoder = tokenizer.get_added_tokens_decoder()
        self._ids = {token.content: index for index, token in decoder.items()}
        self._affixes = _affixes(tokenizer, described)
        # Special tokens that are split are encoded as text.
        added = [token for token in decoder.values() if not (token.special and tokenizer.encode_special_tokens)]
        # Without a splitter, the whole text is one piece: repeated prompts still hit the cache.
        self._splitter: re.Pattern[str] | None = None
        if added and _piecewise(described) and not any(_position_dependent(token) for token in added):
            self._splitter = re.compile(f"({_trie_pattern([token.content for token in added])})")
            if not self._agrees():
                self._splitter = None

    @property
    def caches_pieces(self) -> bool:
        return self._splitter is not None

    def pending(self, text: str, *, add_special_tokens: bool, truncation: int | None = None) -> Pending:
        """Cut ``text`` into pieces, with ids already for added tokens and for text seen before."""
        if add_special_tokens and self._affixes is None:
            return Pending([text], add_special_tokens=True, truncation=truncation)
        parts = self._splitter.split(text) if self._splitter is not None else [text]
        pieces: list[str | tuple[int, ...]] = []
        with self._lock:
            for index, part in enumerate(parts):
                if index % 2:
                    pieces.append((self._ids[part],))
                elif part:
                    cached = self._cache.get(part)
                    if cached is not None:
                        self._cache.move_to_end(part)
                    pieces.append(part if cached is None else cached)
        return Pending(pieces, add_special_tokens=add_special_tokens, truncation=truncation)

    def finish(self, pending: Pending) -> list[int]:
        """Encode the new pieces and join them, truncated as the tokenizer would, between the special tokens."""
        if pending.add_special_tokens and self._affixes is None:
            if pending.truncation is not None:
                raise ValueError("cannot truncate for this tokenizer: its post-processor is not one this gateway knows")
            (text,) = pending.pieces
            assert isinstance(text, str)
            return self._encode(text, add_special_tokens=True)
        ids = self._join(pending.pieces, remember=True)
        prefix, suffix = self._affixes if pending.add_special_tokens and self._affixes else ((), ())
        if pending.truncation is not None:
            room = pending.truncation - len(prefix) - len(suffix)
            if room < 0:
                raise ValueError(f"truncate_prompt_tokens={pending.truncation} leaves no room for special tokens")
            ids = truncate(ids, room, TRUNCATION_SIDE)
        return [*prefix, *ids, *suffix] if prefix or suffix else ids

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # A batch of one: unlike encode, a batch releases the GIL.
        return self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def _join(self, pieces: Sequence[str | tuple[int, ...]], *, remember: bool) -> list[int]:
        new = list(dict.fromkeys(piece for piece in pieces if isinstance(piece, str)))
        # The fast batch skips computing offsets; the ids are the same.
        encodings = self._tokenizer.encode_batch_fast(new, add_special_tokens=False) if new else []
        encoded = {text: tuple(encoding.ids) for text, encoding in zip(new, encodings, strict=True)}
        ids: list[int] = []
        for piece in pieces:
            ids.extend(encoded[piece] if isinstance(piece, str) else piece)
        if remember and encoded:
            self._remember(encoded)
        return ids

    def _remember(self, encoded: Mapping[str, tuple[int, ...]]) -> None:
        if not self._capacity:
            return
        with self._lock:
            for text, ids in encoded.items():
                if len(ids) > self._capacity // 8 or text in self._cache:
                    continue
                self._cache[text] = ids
                self._cached_tokens += len(ids)
            while self._cached_tokens > self._capacity:
                _, ids = self._cache.popitem(last=False)
                self._cached_tokens -= len(ids)

    def _agrees(self) -> bool:
        """Whether pieces encode as the whole text does, on a probe around every added token."""
        filler = ["Hello", " world", "  two  spaces ", "\n", "\tx", "é ü 字 🙂", "a", " ", "1234", "x\n\n"]
        probe = " lead" + "".join(f"{filler[i % len(filler)]}{token}" for i, token in enumerate(self._ids)) + " tail"
        return self._encode(probe, add_special_tokens=False) == self._join(
            self.pending(probe, add_special_tokens=False).pieces, remember=False
        )


def _add_missing_tokens(tokenizer: Tokenizer, config: Mapping[str, Any], special_tokens: Sequence[object]) -> None:
    """TokenizersBackend.__init__: tokens of the config the tokenizer lacks become added tokens."""
    # Imported here: Hugging Face's tokenizers is an optional extra, checked for when a directory is loaded.
    from tokenizers import AddedToken

    wanted: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for _, value in sorted(decoder.items(), key=lambda item: int(item[0])):
            if isinstance(value, dict) and isinstance(value.get("content"), str):
                flags = {
                    k: bool(value[k])
                    for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                    if k in value
                }
                wanted.append(AddedToken(value["content"], **flags))
    for value in special_tokens:
        text = token_text(value)
        if text is not None:
            wanted.append(AddedToken(text, special=True, normalized=False))
    seen = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = []
    for token in wanted:
        if token.content not in seen:
            seen.add(token.content)
            missing.append(token)
    if missing:
        tokenizer.add_tokens(missing)


def _piecewise(described: Mapping[str, Any]) -> bool:
    """Whether the pre-tokenizer treats every piece alike (see the module's docstring)."""

    def walk(node: object) -> bool:
        if node is None:
            return True
        if not isinstance(node, dict):
            return False
        kind = node.get("type")
        if kind not in _PIECEWISE_PRE_TOKENIZERS:
            return False
        if kind == "Metaspace" and node.get("prepend_scheme", "always") == "first":
            return False
        return all(walk(child) for child in node.get("pretokenizers", []))

    model = described.get("model") or {}
    return walk(described.get("pre_tokenizer")) and model.get("dropout") in (None, 0, 0.0)


def _position_dependent(token: AddedToken) -> bool:
    return bool(token.normalized or token.lstrip or token.rstrip or token.single_word)


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex matching the longest of ``words`` at the leftmost place, as the tokenizer's matcher does.

    A plain alternation of hundreds of special tokens is slow in ``re`` (8 times slower with 257
    of them); a trie shares prefixes.
    """
    trie: dict[str, Any] = {}
    for word in filter(None, words):
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        # Longer words first: at most one branch can continue (their first characters differ).
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


def _affixes(tokenizer: Tokenizer, described: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The ids a post-processor puts before and after a single sequence, if it is one that only does that."""
    processor = described.get("post_processor")
    if processor is not None and processor.get("type") not in _AFFIX_POST_PROCESSORS:
        return None
    found = set()
    for probe in ("a", "Hello world\n", " 12"):
        bare = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe, add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
        if not bare or at is None:
            return None
        found.add((tuple(full[:at]), tuple(full[at + len(bare) :])))
    return found.pop() if len(found) == 1 else None
