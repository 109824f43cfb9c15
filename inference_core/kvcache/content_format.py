"""Whether a chat template wants message content as text or as parts, guessed as vLLM 0.32 guesses it.

vLLM hands a template each message's content either as one string (text parts joined by
newlines) or as the list of parts, and picks one from the template's syntax tree: the "openai"
format if some loop runs over a message's content (``for part in message.content``, where
``message`` is a loop variable over ``messages`` or over a variable assigned from it), over a
macro parameter that a call passes such content, or, outside macros, over a variable named
``content``; the "string" format otherwise. The prompt's text, and so its token ids, depend on
the choice, so this is a port of ``renderers/hf.py`` ``_detect_content_format`` and the
``_iter_nodes_*`` helpers it uses, quirks included: vLLM asserts that assignment and loop
targets are plain names, and a template where one is not falls back to "string".
"""

from __future__ import annotations

from collections.abc import Iterator

import jinja2.nodes

from inference_core.kvcache.chat_request import ContentFormat


class _NotAName(Exception):
    """An assignment or loop target vLLM's detector does not follow (it asserts a plain name)."""


def content_format(ast: jinja2.nodes.Template) -> ContentFormat:
    """The content format of a parsed template (``Environment.parse``)."""
    try:
        next(_content_loops(ast))
    except (StopIteration, _NotAName):
        return "string"
    return "openai"


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Test):
        return _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _target_name(node: jinja2.nodes.Node) -> str:
    if not isinstance(node, jinja2.nodes.Name):
        raise _NotAName
    return node.name


def _names_bound_to(root: jinja2.nodes.Template, name: str) -> Iterator[str]:
    yield name
    related = [name]
    while related:
        current = related.pop(0)
        for assign in root.find_all(jinja2.nodes.Assign):
            if _is_var_or_elems(assign.node, current):
                target = _target_name(assign.target)
                yield target
                if target != current:
                    related.append(target)


def _message_loop_names(root: jinja2.nodes.Template) -> Iterator[str]:
    names = list(_names_bound_to(root, "messages"))
    for loop in root.find_all(jinja2.nodes.For):
        for name in names:
            if _is_var_or_elems(loop.iter, name):
                yield _target_name(loop.target)
                break


def _content_loops(root: jinja2.nodes.Template) -> Iterator[str]:
    """Loops over a message's content, directly or through a macro parameter."""
    message_names = list(_message_loop_names(root))
    params_by_loop: dict[int, set[str]] = {}
    loops_in_macros: set[int] = set()
    for macro in root.find_all(jinja2.nodes.Macro):
        param_names = {arg.name for arg in macro.args}
        content_params: set[str] = set()
        for call in root.find_all(jinja2.nodes.Call):
            if isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name:
                for i, arg in enumerate(call.args):
                    if i < len(macro.args) and any(_is_var_or_elems(arg, n, "content") for n in message_names):
                        content_params.add(macro.args[i].name)
                for keyword in call.kwargs:
                    if (
                        isinstance(keyword, jinja2.nodes.Keyword)
                        and keyword.key in param_names
                        and any(_is_var_or_elems(keyword.value, n, "content") for n in message_names)
                    ):
                        content_params.add(keyword.key)
        for loop in macro.find_all(jinja2.nodes.For):
            loops_in_macros.add(id(loop))
            if content_params:
                params_by_loop[id(loop)] = content_params
    for loop in root.find_all(jinja2.nodes.For):
        over = loop.iter.name if isinstance(loop.iter, jinja2.nodes.Name) else None
        if (
            any(_is_var_or_elems(loop.iter, name, "content") for name in message_names)
            or (over is not None and over in params_by_loop.get(id(loop), ()))
            or (over == "content" and id(loop) not in loops_in_macros)
        ):
            yield _target_name(loop.target)
