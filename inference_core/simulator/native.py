"""vLLM's own routes as the simulator answers them: tokenize, detokenize, score, rerank, classify, pooling.

Each function takes a checked request body and returns the answer in vLLM's shape. Tokens are
the UTF-8 bytes of the text (a chat's: its messages' contents, one a line), so detokenize
inverts tokenize; a simulator given a tokenizer directory answers ``/tokenize`` with that
instead. Scores are cosine similarities of the simulator's deterministic embeddings.
``ValueError`` and ``TypeError`` mean a bad request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from inference_core.simulator import generate

Body = dict[str, Any]
_DIMENSIONS = 32
_LABELS = ("negative", "positive")


def _text(body: Body) -> str:
    if "messages" in body:
        return "\n".join(str(message["content"]) for message in body["messages"])
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a string")
    return prompt


def _texts(value: object) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError("expected a string or a non-empty list of strings")
    return texts


def _similarity(first: str, second: str) -> float:
    a, b = generate.embedding(first, _DIMENSIONS), generate.embedding(second, _DIMENSIONS)
    return (1 + sum(x * y for x, y in zip(a, b, strict=True))) / 2  # in [0, 1]


def _listed(kind: str, body: Body, data: list[dict[str, Any]], tokens: int) -> Body:
    return {
        "id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": body["model"],
        "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }  # fmt: skip


def prompt_tokens(body: Body) -> list[int]:
    """A chat's or completion's token ids, as ``/tokenize`` answers and the prefix cache keys them."""
    return list(_text(body).encode())


def tokenized(tokens: list[int]) -> Body:
    """``/tokenize``'s answer for these token ids."""
    return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens, "token_strs": None}


def tokenize(body: Body) -> Body:
    return tokenized(prompt_tokens(body))


def detokenize(body: Body) -> Body:
    tokens = body["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < 256 for t in tokens):
        raise ValueError("tokens must be a list of token ids")
    return {"prompt": bytes(tokens).decode(errors="replace")}


def score(body: Body) -> Body:
    firsts, seconds = _texts(body["text_1"]), _texts(body["text_2"])
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError("text_1 and text_2 must pair up")
    data = [
        {"index": index, "object": "score", "score": _similarity(first, second)}
        for index, (first, second) in enumerate(zip(firsts, seconds, strict=True))
    ]
    return _listed("score", body, data, sum(len(text) for text in firsts + seconds) // 4)


def rerank(body: Body) -> Body:
    query, documents = body["query"], _texts(body["documents"])
    if not isinstance(query, str):
        raise TypeError("query must be a string")
    scores = [_similarity(query, document) for document in documents]
    ranked = sorted(range(len(documents)), key=lambda index: -scores[index])
    results = [
        {"index": index, "document": {"text": documents[index]}, "relevance_score": scores[index]} for index in ranked
    ]
    top = body.get("top_n") or len(results)
    tokens = sum(len(text) for text in [query, *documents]) // 4
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": body["model"], "usage": {"total_tokens": tokens},
            "results": results[:top]}  # fmt: skip


def classify(body: Body) -> Body:
    data = []
    for index, text in enumerate(_texts(body["input"])):
        positive = _similarity(text, "good")
        probs = [1 - positive, positive]
        data.append({"index": index, "label": _LABELS[positive > 0.5], "probs": probs, "num_classes": 2})
    return _listed("classify", body, data, 0)


def pooling(body: Body) -> Body:
    data = [
        {"index": index, "object": "pooling", "data": generate.embedding(text, _DIMENSIONS)}
        for index, text in enumerate(_texts(body["input"]))
    ]
    return _listed("pool", body, data, 0)


ROUTES: dict[str, Callable[[Body], Body]] = {
    "/tokenize": tokenize,
    "/detokenize": detokenize,
    "/score": score,
    "/v1/score": score,
    "/rerank": rerank,
    "/v1/rerank": rerank,
    "/v2/rerank": rerank,
    "/classify": classify,
    "/pooling": pooling,
}
