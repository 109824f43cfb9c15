"""A Hugging Face tokenizer directory's files, read as transformers 5 reads them.

``tokenizer.json`` is the Rust tokenizer; ``tokenizer_config.json`` names the special tokens
(which chat templates read as variables and which the tokenizer must know) and may hold the
chat template, unless ``chat_template.jinja`` or ``additional_chat_templates/`` do; older
directories keep their special tokens in ``special_tokens_map.json``. The functions here only
read and interpret those files; ``encoder`` and ``chat_template`` build on what they return.
Every failure is a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def one_line(exc: BaseException) -> str:
    """A foreign exception's message on one line, for a ``ValueError`` of ours."""
    return " ".join(str(exc).split()) or type(exc).__name__


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {one_line(exc)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value


def read_tokenizer(path: Path) -> Tokenizer:
    """``tokenizer.json`` as is: ``TokenizersBackend`` reads it without rebuilding the pipeline."""
    # Imported here: Hugging Face's tokenizers is an optional extra, checked for when a directory is loaded.
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:
        raise ValueError(f"cannot read {path / 'tokenizer.json'}: {one_line(exc)}") from None


def template_sources(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The chat templates as transformers 5 loads them: files first, then tokenizer_config.json.

    A single template is keyed ``""``; several are keyed by name.
    """
    files: dict[str, str] = {}
    if (path / "chat_template.jinja").is_file():
        files["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if files:
        return {"": files["default"]} if list(files) == ["default"] else files
    configured = config.get("chat_template")
    if isinstance(configured, str):
        return {"": configured}
    if isinstance(configured, list) and configured:
        named = {}
        for entry in configured:
            name, source = (entry.get("name"), entry.get("template")) if isinstance(entry, dict) else (None, None)
            if not (isinstance(name, str) and isinstance(source, str)):
                raise ValueError("tokenizer_config.json: chat_template entries need a name and a template")
            named[name] = source
        return named
    raise ValueError(
        f"tokenizer directory {path} has no chat template "
        "(no chat_template in tokenizer_config.json, no chat_template.jinja)"
    )


def token_text(value: object) -> str | None:
    """A special token of the config: a string, or an AddedToken as transformers serializes it."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("__type") == "AddedToken" and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def special_tokens(path: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], list[object]]:
    """The template's token variables (transformers 5's special_tokens_map), and the extra special tokens.

    Every ``*_token`` string of the config and a dict of ``extra_special_tokens`` are variables;
    a list of extra special tokens is not. special_tokens_map.json fills in, as transformers
    does, only for configs without ``added_tokens_decoder``.
    """
    merged = dict(config)
    legacy = path / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        for key, value in read_json(legacy).items():
            if key == "extra_special_tokens" and isinstance(value, list):
                existing = list(merged.get("extra_special_tokens") or [])
                merged[key] = existing + [token for token in value if token not in existing]
            elif isinstance(value, dict) and isinstance(value.get("content"), str):
                merged[key] = value["content"]  # an AddedToken, in this file without its "__type"
            else:
                merged[key] = value
    if "additional_special_tokens" in merged and "extra_special_tokens" not in merged:
        merged["extra_special_tokens"] = merged.pop("additional_special_tokens")
    extra = merged.get("extra_special_tokens")
    named = [(key, value) for key, value in merged.items() if key.endswith("_token")]
    if isinstance(extra, dict):
        named += extra.items()
        extra = []
    variables = {key: text for key, value in named if (text := token_text(value)) is not None}
    return variables, list(extra) if isinstance(extra, list) else []
