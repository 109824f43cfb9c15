"""An OpenAI chat completions body as vLLM 0.32 hands it to a chat template: messages and kwargs.

A replica does not give the template the request's messages as sent. It validates them into its
request model and parses them for the template's content format, and it builds the template's
keyword arguments from several request fields. This module mirrors, for text-only messages:

- ``entrypoints/openai/chat_completion/protocol.py`` ``build_chat_params`` and
  ``renderers/params.py`` ``merge_kwargs``: which fields reach the template
  (``add_generation_prompt`` true by default, ``continue_final_message``, ``documents``,
  ``reasoning_effort`` -> ``enable_thinking``, ``chat_template_kwargs``); ``None`` and
  ``"auto"`` mean unset;
- ``renderers/online_renderer.py`` ``render_chat``: tools dumped through vLLM's pydantic model
  (missing ``description``/``parameters`` become ``null``, unknown keys dropped);
- ``renderers/chat_utils.py`` ``parse_chat_messages``: content as a string or as a list of
  parts ("string" or "openai" content format; in the first, text parts are joined with
  newlines), tool messages' text parts joined, assistant ``tool_calls`` arguments parsed into
  objects (``_postprocess_messages``), ``reasoning``, ``name``, the Claude Code billing header
  dropped;
- ``renderers/hf.py`` ``_consolidate_system_messages``: ``developer`` messages as ``system``
  ones, for templates that do not know the role.

The request is never modified: what the template may change is copied.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Literal

#: vLLM's ChatTemplateContentFormat: content as joined text, or as a list of parts.
ContentFormat = Literal["string", "openai"]

# Content part types vLLM reads as text, and the key holding the text (chat_utils.MM_PARSER_MAP).
# (input_text and output_text are read too, but chat completions' request model rejects them.)
_TEXT_PARTS = {"text": "text", "refusal": "refusal", "thinking": "thinking"}
# Keys of every content part type vLLM knows; in the "openai" format the others ride along.
_KNOWN_PART_KEYS = frozenset({
    "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil", "image_url", "input_audio",
    "name", "prompt_cache_breakpoint", "refusal", "text", "thinking", "type", "uuid", "video_embeds", "video_url"
})  # fmt: skip
# Keys that make a content part media whatever its type (chat_utils._MEDIA_CONTENT_PART_KEYS).
_MEDIA_KEYS = frozenset({
    "image_url", "input_image", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds", "image_pil",
    "audio_url", "input_audio", "video_url"
})  # fmt: skip
_BILLING_HEADER = "x-anthropic-billing-header"


def flag(payload: Mapping[str, Any], key: str, default: bool) -> bool:
    value = payload.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a boolean")
    return value


def as_list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{what} must be a list")
    return list(value)


def template_kwargs(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs vLLM hands to apply_chat_template for a chat completions request.

    ChatCompletionRequest.build_chat_params, then ChatParams.with_defaults with the tools,
    then get_apply_chat_template_kwargs: request fields override ``chat_template_kwargs``,
    which override the tools. A chat template in either is refused, as vLLM does by default.
    vLLM also forces ``return_dict`` false (apply_chat_template consumes it): that is why
    ``return_assistant_tokens_mask`` is refused.
    """
    if payload.get("chat_template") is not None:
        raise ValueError("the request carries its own chat_template, which vLLM refuses by default")
    requested = payload.get("chat_template_kwargs") or {}
    if not isinstance(requested, dict):
        raise ValueError("chat_template_kwargs must be an object")
    if requested.get("chat_template") is not None:
        raise ValueError("chat_template_kwargs carries a chat_template, which vLLM refuses by default")
    add_generation_prompt = flag(payload, "add_generation_prompt", True)
    continue_final = flag(payload, "continue_final_message", False)
    if add_generation_prompt and continue_final:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    reasoning_effort = payload.get("reasoning_effort")
    fields: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final,
        "documents": payload.get("documents"),
        "reasoning_effort": reasoning_effort,
    }
    if reasoning_effort is not None and "enable_thinking" not in requested:
        fields["enable_thinking"] = reasoning_effort != "none"
    defaults = _merge({"tokenize": False}, {"tools": _tool_dicts(payload.get("tools"))})
    return _merge(defaults, _merge(requested, fields))


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """params.merge_kwargs: ``None`` and ``"auto"`` in ``overrides`` leave the default."""
    return {**defaults, **{key: value for key, value in overrides.items() if not _unset(value)}}


def _unset(value: object) -> bool:
    return value is None or (isinstance(value, str) and value == "auto")


def _tool_dicts(tools: object) -> list[dict[str, Any]] | None:
    """ChatCompletionToolsParam.model_dump() for each tool: vLLM's fields only, unset ones null."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list")
    dumped = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError("each tool must be an object of type 'function'")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("each tool needs a function with a name")
        out: dict[str, Any] = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        if function.get("strict") is not None:
            out["strict"] = function["strict"]
        defer_loading = function.get("defer_loading")
        if defer_loading is None:
            defer_loading = tool.get("defer_loading")
        if defer_loading is not None:
            out["defer_loading"] = defer_loading
        entry: dict[str, Any] = {"type": "function", "function": out}
        if tool.get("defer_loading") is not None:
            entry["defer_loading"] = tool["defer_loading"]
        dumped.append(entry)
    return dumped


def conversation(messages: list[Any], content_format: ContentFormat) -> list[dict[str, Any]]:
    """chat_utils.parse_chat_messages for text-only messages, then _postprocess_messages."""
    parsed = [_message(message, content_format) for message in messages]
    for message in parsed:
        if message["role"] == "assistant" and "tool_calls" in message:
            _parse_arguments(message)
    return parsed


def _message(message: object, content_format: ContentFormat) -> dict[str, Any]:
    """chat_utils._parse_chat_message_content for a text-only message."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError("each message must be an object with a string role")
    role: str = message["role"]
    result: dict[str, Any] = {"role": role, "content": _content(role, message.get("content"), content_format)}
    if role == "assistant":
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            result["tool_calls"] = [_tool_call(call) for call in as_list(tool_calls, "tool_calls")]
        reasoning = message.get("reasoning")
        if reasoning is not None:
            result["reasoning"] = reasoning
            result["reasoning_content"] = reasoning
    elif role == "tool":
        if "tool_call_id" in message:
            result["tool_call_id"] = message["tool_call_id"]
        content = result["content"]
        if isinstance(content, list) and all(part.get("type") == "text" for part in content):
            result["content"] = "\n".join(part.get("text", "") for part in content)
    if isinstance(message.get("name"), str):
        result["name"] = message["name"]
    if isinstance(message.get("task"), str):
        result["task"] = message["task"]
    if role == "developer":
        result["tools"] = copy.deepcopy(message.get("tools"))
    return result


def _content(role: str, content: object, content_format: ContentFormat) -> str | list[dict[str, Any]]:
    """A message's content in the template's format: text joined by newlines, or text parts."""
    if isinstance(content, str) and not (role == "system" and content.startswith(_BILLING_HEADER)):
        return content if content_format == "string" else [{"type": "text", "text": content}]
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    else:
        parts = as_list(content, "content")
    if role == "system":
        parts = _without_billing_header(parts)
    texts: list[Any] = []
    dicts: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            dicts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            raise ValueError("content parts must be objects or strings")
        kind = part.get("type")
        if isinstance(kind, str) and kind in _TEXT_PARTS and part.get("uuid") is None:
            text = part.get(_TEXT_PARTS[kind])
            if text is None and kind in ("text", "refusal"):
                continue
            if content_format == "string" and not isinstance(text, str):
                raise ValueError(f"a {kind!r} content part needs its text")
            texts.append(text)
            dicts.append({"type": "text", "text": text, **{k: v for k, v in part.items() if k not in _KNOWN_PART_KEYS}})
        elif kind == "tool_reference" and part.get("uuid") is None:
            name = part.get("name")
            if content_format == "string" and not isinstance(name, str):
                raise ValueError("a tool_reference content part needs a name")
            texts.append(name)
            dicts.append({"type": "tool_reference", "name": name})
        else:
            raise ValueError(f"cannot tokenize a {kind!r} content part: only text content is supported")
    return dicts if content_format == "openai" else "\n".join(texts)


def _without_billing_header(parts: list[Any]) -> list[Any]:
    """chat_utils._strip_claude_code_billing_header: its per-request value would defeat prefix caching."""
    kept = []
    for part in parts:
        text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else part
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            kept.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            kept.append(rest if isinstance(part, str) else {**part, "text": rest})
    return kept


def _tool_call(call: object) -> Any:
    """A tool call with its keys in the order of vLLM's validated TypedDicts (id, function, type)."""
    if not isinstance(call, dict):
        return copy.deepcopy(call)
    ordered = _keys_first(call, ("id", "function", "type"))
    if isinstance(ordered.get("function"), dict):
        ordered["function"] = _keys_first(ordered["function"], ("arguments", "name"))
    return copy.deepcopy(ordered)


def _keys_first(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``mapping`` with those of ``keys`` it has first, in that order (a dict keeps a key's first place)."""
    return {**{key: mapping[key] for key in keys if key in mapping}, **mapping}


def _parse_arguments(message: dict[str, Any]) -> None:
    """chat_utils._postprocess_messages: tool call arguments become objects, as templates expect."""
    calls = message["tool_calls"]
    if not calls:
        del message["tool_calls"]
        return
    for call in calls:
        if not isinstance(call, dict):
            raise ValueError("assistant tool_calls entries must be objects")
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValueError("assistant tool_calls must be of type 'function'")
        arguments = function.get("arguments")
        if not arguments:
            function["arguments"] = {}
            continue
        parsed = arguments
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                # vLLM keeps the conversation going rather than failing every later turn.
                parsed = None
        function["arguments"] = parsed if isinstance(parsed, dict) else {}


def developer_as_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """hf.py, for a template that does not know the ``developer`` role: it becomes ``system``."""
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            message = {**message, "role": "system"}
            message.pop("tools", None)
        converted.append(message)
    return _consolidate_system(converted)


def _consolidate_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """hf._consolidate_system_messages: all system messages merged into the first position."""
    contents: list[str] = []
    others: list[dict[str, Any]] = []
    needed = False
    for index, message in enumerate(conversation):
        if message["role"] != "system":
            others.append(message)
            continue
        if index > 0 or contents:
            needed = True
        content = message.get("content", "")
        if isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, dict) and "text" in part:
                    texts.append(part["text"])
                elif isinstance(part, str):
                    texts.append(part)
            content = "\n".join(texts)
        if content:
            contents.append(content)
    if not needed:
        return conversation
    return [{"role": "system", "content": "\n\n".join(contents)}, *others]


def has_media(message: object) -> bool:
    """chat_utils.has_non_text_content, for one message."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return False
    return any(
        isinstance(part, dict)
        and (
            part.get("type", "text") not in (*_TEXT_PARTS, "input_text", "output_text", "tool_reference")
            or bool(part.keys() & _MEDIA_KEYS)
        )
        for part in content
    )
