"""A chat completions body rendered to prompt text, as vLLM 0.32 renders it with transformers 5.

The text is what a replica encodes, so it must be the replica's to the character. This module
mirrors:

- transformers' ``chat_template_utils``: the sandboxed Jinja environment
  (``_cached_compile_jinja_template``: ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
  ``{% generation %}``, its own ``tojson``, ``raise_exception``, ``strftime_now``) and
  ``render_jinja_template`` (``continue_final_message`` cuts the text after the final message);
- transformers' ``apply_chat_template``: named templates (``get_chat_template``: ``tool_use``
  when tools are given), the special tokens passed as variables, the arguments it consumes;
- vLLM's ``renderers/hf.py``: the content format detected from the template (see
  ``content_format``), ``developer`` turned into ``system`` for templates that do not know it,
  request kwargs kept only if the template or ``apply_chat_template`` names them
  (``resolve_chat_template_kwargs``, ``_get_hf_base_chat_template_params``).

How the request becomes messages and kwargs is ``chat_request``'s. Not mirrored: server flags
that change rendering (``--chat-template``, ``--chat-template-content-format``,
``--default-chat-template-kwargs``, ``--exclude-tools-when-tool-choice-none``) and a chat
template sent in the request (vLLM refuses it by default).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.sandbox

from inference_core.kvcache import chat_request
from inference_core.kvcache.chat_request import ContentFormat
from inference_core.kvcache.content_format import content_format
from inference_core.kvcache.tokenizer_files import one_line

# transformers' PythonBackend.apply_chat_template parameters: vLLM passes request kwargs with
# these names whatever the template declares (hf.py _get_hf_base_chat_template_params).
_APPLY_PARAMS = frozenset({
    "self", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"
})  # fmt: skip
# ... of which these never reach the template (apply_chat_template consumes them).
_APPLY_CONSUMED = frozenset({
    "documents", "add_generation_prompt", "continue_final_message", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"
})  # fmt: skip
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template compiled once, with what vLLM derives from its source."""

    source: str
    compiled: jinja2.Template
    #: Variables the template reads from outside: request kwargs it may receive.
    variables: frozenset[str]
    content_format: ContentFormat
    knows_developer: bool


def compile_templates(sources: Mapping[str, str]) -> dict[str, ChatTemplate]:
    """Compile each template; ``ValueError`` names the template and line of a syntax error."""
    environment = _environment()
    templates = {}
    for name, source in sources.items():
        try:
            ast = environment.parse(source)
            compiled = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            where = f"chat template {name!r}" if name else "chat template"
            raise ValueError(f"{where}, line {exc.lineno}: {exc.message}") from None
        templates[name] = ChatTemplate(
            source=source,
            compiled=compiled,
            variables=frozenset(jinja2.meta.find_undeclared_variables(ast)),
            content_format=content_format(ast),
            knows_developer='"developer"' in source or "'developer'" in source,
        )
    return templates


class ChatTemplates:
    """A model's chat templates, with the special tokens transformers passes them as variables."""

    def __init__(self, templates: Mapping[str, ChatTemplate], special_tokens: Mapping[str, str]) -> None:
        self._templates = dict(templates)
        self._special_tokens = dict(special_tokens)

    def render(self, payload: Mapping[str, Any]) -> tuple[str, bool]:
        """The text vLLM's HF renderer renders a chat body to; also whether the request asked to tokenize it."""
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise ValueError("messages must be a list")
        kwargs = chat_request.template_kwargs(payload)
        tools = kwargs.pop("tools", None)
        tokenize = bool(kwargs.pop("tokenize"))
        template = self._template(tools)
        conversation = chat_request.conversation(messages, template.content_format)
        if not template.knows_developer and any(message["role"] == "developer" for message in conversation):
            conversation = chat_request.developer_as_system(conversation)
        accepted = (template.variables | _APPLY_PARAMS) - {"self", "conversation"}
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        return self._apply(template, conversation, tools, kwargs), tokenize

    def _template(self, tools: object) -> ChatTemplate:
        """transformers' get_chat_template: one template, or the named ones (``tool_use`` for tools)."""
        if len(self._templates) == 1 and "" in self._templates:
            return self._templates[""]
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise ValueError(f"the model has several chat templates and none is the default: {sorted(self._templates)}")

    def _apply(
        self, template: ChatTemplate, conversation: list[dict[str, Any]], tools: object, kwargs: dict[str, Any]
    ) -> str:
        """transformers' apply_chat_template(tokenize=False) and render_jinja_template."""
        if not conversation:
            raise ValueError("cannot apply the chat template to an empty conversation")
        documents = kwargs.get("documents")
        continue_final = kwargs.get("continue_final_message", False)
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("return_assistant_tokens_mask needs tokenize=True and return_dict=True")
        if tools is not None and not all(isinstance(tool, dict) for tool in chat_request.as_list(tools, "tools")):
            raise ValueError("tools must be JSON schemas (objects)")
        if documents is not None and not all(
            isinstance(doc, dict) for doc in chat_request.as_list(documents, "documents")
        ):
            raise ValueError("documents must be a list of objects")
        variables = {**self._special_tokens, **{k: v for k, v in kwargs.items() if k not in _APPLY_CONSUMED}}
        if "messages" in variables:
            raise ValueError("chat_template_kwargs cannot set messages")
        final_text = ""
        if continue_final:
            conversation = copy.deepcopy(conversation)
            final_text = _tag_final_message(conversation[-1], template.source)
        try:
            rendered = template.compiled.render(
                messages=conversation,
                tools=tools,
                documents=documents,
                add_generation_prompt=kwargs.get("add_generation_prompt", False),
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template rejected the request: {one_line(exc)}") from None
        except Exception as exc:
            raise ValueError(f"the chat template failed: {type(exc).__name__}: {one_line(exc)}") from None
        if not continue_final:
            return rendered
        if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError("continue_final_message is set but the template drops part of the final message")
        cut = rendered.rindex(_CONTINUE_TAG.strip())
        if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:cut]
        return rendered[:cut].rstrip()


def _tag_final_message(message: dict[str, Any], source: str) -> str:
    """Mark where the final message ends (render_jinja_template's continue_final_message); its text."""
    content = message.get("content")
    if content is None:
        raise ValueError('continue_final_message is set but the final message has no "content" to continue')
    if "content" not in source:
        raise ValueError('continue_final_message is set but the chat template has no "content"')
    if isinstance(content, list | tuple):
        for block in reversed(content):
            if "text" in block:
                text = str(block["text"])
                block["text"] = block["text"] + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text to continue")
    message["content"] = content + _CONTINUE_TAG
    return str(content)


def _environment() -> jinja2.Environment:
    """transformers' chat template environment (chat_template_utils._cached_compile_jinja_template)."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training; it renders as is."""

    tags = {"generation"}  # noqa: RUF012 - Jinja's own class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_generation")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _generation(self, caller: jinja2.runtime.Macro) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Not Jinja's own: that one escapes HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
