"""Deterministic model output: text, JSON matching a schema, tool arguments and embeddings.

Everything is a function of the request, so a test can ask twice and get the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from typing import Any

VOCABULARY = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "gentle",
    "rain",
    "falls",
    "on",
    "quiet",
    "hills",
    "and",
    "bright",
    "stars",
    "shine",
    "above",
    "old",
    "towns",
    "where",
    "curious",
    "people",
    "share",
    "stories",
    "of",
    "distant",
    "seas",
]


def rng_for(*parts: object) -> random.Random:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def text_tokens(rng: random.Random, limit: int, *, to_limit: bool = False) -> tuple[list[str], str]:
    """Up to ``limit`` word tokens (with leading spaces) and the finish reason.

    ``to_limit`` (vLLM's ``ignore_eos``) generates exactly ``limit`` tokens.
    """
    natural = limit + 1 if to_limit else rng.randint(8, 24)
    count = min(natural, limit)
    tokens = [(" " if i else "") + rng.choice(VOCABULARY) for i in range(count)]
    return tokens, "length" if natural > limit else "stop"


def instance(schema: Any, rng: random.Random, root: Any = None, depth: int = 0) -> Any:
    """A JSON value valid for ``schema`` (the subset real clients use: types, enums, refs)."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return {}
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {}) if part else target
        return instance(target, rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance(schema[key][0], rng, root, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance(sub, rng, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        count = max(schema.get("minItems", 0), 0 if depth > 3 else 2)
        count = min(count, schema.get("maxItems", count))
        return [instance(schema.get("items", {}), rng, root, depth + 1) for _ in range(count)]
    if kind == "string":
        word = rng.choice(VOCABULARY)
        return word * max(1, math.ceil(schema.get("minLength", 0) / len(word)))
    if kind == "integer":
        return int(schema.get("minimum", rng.randint(0, 100)))
    if kind == "number":
        return float(schema.get("minimum", rng.randint(0, 1000) / 10))
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector determined by ``text``."""
    rng = rng_for("embedding", text)
    vector = [rng.gauss(0, 1) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def as_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
