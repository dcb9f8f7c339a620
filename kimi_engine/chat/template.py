"""Chat templates: render OpenAI-format messages with a checkpoint's Jinja template, as HF transformers'
apply_chat_template does (render_jinja_template and friends), in jinja2's immutable sandbox."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from importlib import resources

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment



class _Undefined(jinja2.Undefined):
    """HF's Undefined, except that reaching for an unsafe attribute (`''.__class__`) fails at once.

    The sandbox returns an Undefined for such attributes that only raises when used further; a
    template that prints it would render '' and go on. Nothing legitimate needs them.
    """

    def __init__(self, hint=None, obj=jinja2.utils.missing, name=None, exc=UndefinedError):
        if exc is SecurityError:
            raise SecurityError(hint)
        super().__init__(hint, obj, name, exc)


class _Generation(jinja2.ext.Extension):
    """HF's {% generation %}...{% endgeneration %} (marks assistant text for masks): renders its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _check_namespace_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot set underscore attribute {name!r} on a namespace")


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, as HF's does, so templates cannot plant private attributes."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: `self` may also be a keyword of the namespace
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        super().__setitem__(name, value)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's filter: Jinja's own tojson escapes HTML characters and takes no separators.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # A template is untrusted input (it comes with a downloaded checkpoint): sandboxed, immutable.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=_Undefined,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace, dict=lambda *a, **k: dict(*a, **k),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


@lru_cache(maxsize=1)
def builtin_chat_template() -> str:
    """Kimi K2 Thinking's chat template as published (package file chat_template.jinja)."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _plain(value):
    """Rebuild inputs from JSON types, so the sandbox never holds a rich Python object (as HF does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars, ...) carry methods: strip them to the base type.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _message(message) -> dict:
    if not isinstance(message, Mapping):
        raise TypeError(f"each message must be a dict in the OpenAI chat format, got {type(message).__name__}")
    # HF drops None values (OpenAI clients send content=None with tool calls) and fills
    # reasoning_content, the name templates read, from its other spellings.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat_template(messages: list[dict], tools: list[dict] | None = None, *, chat_template: str | None = None,
                         add_generation_prompt: bool = False, **kwargs) -> str:
    """The prompt text for OpenAI-format `messages` and tool schemas `tools`.

    chat_template: Jinja source (None: Kimi K2 Thinking's, built in). kwargs reach the template as
    variables. Raises jinja2's SecurityError when the template reaches for Python internals and
    TemplateError for raise_exception() in the template.
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty list of messages")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise TypeError("tools must be a list of JSON-schema dicts in the OpenAI format")
    template = _compile(builtin_chat_template() if chat_template is None else chat_template)
    return template.render(messages=_plain([_message(m) for m in messages]), tools=_plain(tools), documents=None,
                           add_generation_prompt=add_generation_prompt, **_plain(kwargs))
