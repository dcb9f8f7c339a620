"""Check OpenAI-format chat input before it reaches the template: what a server forwards verbatim.

check_messages(messages) and check_tools(tools) raise ValueError naming the field at fault
(`messages[2].role`, `messages[1].tool_calls[0].function.name`, `tools[1].function.name`) instead of
letting a bad message render silently (the template prints an unknown role as a system turn and an
undefined field as '') or fail deep inside Jinja.

What OpenAI clients really send is accepted: content None on an assistant message that carries
tool calls; `reasoning_content` / `reasoning` / `thinking` on assistant history (Kimi's template
replays the last turns' reasoning); `name` on any message (the template prints it as the speaker);
a response message echoed back whole (`"refusal": null`, `"audio": null`, `"tool_calls": null`);
any other extra key, which the template ignores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")   # the spellings the template reads
# OpenAI's own rule for function names. Kimi writes a call id as functions.NAME:IDX and the parser
# reads NAME back up to the last ':', so a name outside this set could not survive a round trip.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _type(value) -> str:
    return "None" if value is None else type(value).__name__


def _string(value, field: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {_type(value)}")
    if non_empty and not value:
        raise ValueError(f"{field} must not be empty")
    return value


def _mapping(value, field: str, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be {what}, got {_type(value)}")
    return value


def _check_content(content, field: str) -> None:
    """A string, or a list of text parts {"type": "text", "text": str} (the model reads text only)."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{field} must be a string or a list of text parts, got {_type(content)}")
    for j, part in enumerate(content):
        where = f"{field}[{j}]"
        _mapping(part, where, 'a text part {"type": "text", "text": ...}')
        if part.get("type") != "text":
            raise ValueError(f"{where}.type must be 'text' (this model reads text only), got {part.get('type')!r}")
        _string(part.get("text"), f"{where}.text")


def _check_tool_calls(calls, field: str) -> list[str]:
    """An assistant's tool calls, OpenAI format; returns their ids."""
    if not isinstance(calls, list):
        raise ValueError(f"{field} must be a list of tool calls, got {_type(calls)}")
    ids = []
    for j, call in enumerate(calls):
        where = f"{field}[{j}]"
        _mapping(call, where, 'a tool call {"id": ..., "type": "function", "function": {...}}')
        ids.append(_string(call.get("id"), f"{where}.id", non_empty=True))
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be 'function', got {call['type']!r}")
        function = _mapping(call.get("function"), f"{where}.function", 'a dict {"name": ..., "arguments": ...}')
        _string(function.get("name"), f"{where}.function.name", non_empty=True)
        # A string as OpenAI sends it (not parsed: the model's own calls may hold invalid JSON, and a
        # conversation that replays them must still render), or an object, which the template dumps.
        arguments = function.get("arguments")
        if not isinstance(arguments, (str, Mapping)):
            raise ValueError(f"{where}.function.arguments must be a JSON string or an object, got {_type(arguments)}")
    return ids


def check_messages(messages) -> None:
    """Raise ValueError naming the field unless `messages` is a non-empty list of OpenAI chat messages.

    Each message: a dict with `role` in ROLES; `content` a string or a list of text parts (None or
    absent only on an assistant message with tool calls); assistant `tool_calls` a list of
    {"id": str, "type": "function", "function": {"name": str, "arguments": str | dict}}; a tool
    message's `tool_call_id` the id of a call made by an earlier assistant message; `name` and the
    reasoning fields strings when given. None values count as absent; other keys are ignored.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        got = "an empty list" if isinstance(messages, (list, tuple)) else _type(messages)
        raise ValueError(f"messages must be a non-empty list of message dicts, got {got}")
    called: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _mapping(message, where, 'a message dict {"role": ..., "content": ...}')
        if message.get("role") is None:
            raise ValueError(f"{where}.role is missing (one of {', '.join(ROLES)})")
        role = _string(message["role"], f"{where}.role")
        if role not in ROLES:
            raise ValueError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        if message.get("name") is not None:
            _string(message["name"], f"{where}.name")
        calls = message.get("tool_calls")
        if calls is not None and role != "assistant":
            raise ValueError(f"{where}.tool_calls: only assistant messages carry tool calls (role is {role!r})")
        ids = _check_tool_calls(calls, f"{where}.tool_calls") if calls is not None else []
        content = message.get("content")
        if content is None:
            if not ids:
                why = "an assistant message needs content or tool_calls" if role == "assistant" else \
                      f"a {role} message needs content"
                raise ValueError(f"{where}.content is missing or None: {why}")
        else:
            _check_content(content, f"{where}.content")
        if role == "assistant":
            for key in REASONING_KEYS:
                if message.get(key) is not None:
                    _string(message[key], f"{where}.{key}")
        if role == "tool":
            call_id = _string(message.get("tool_call_id"), f"{where}.tool_call_id", non_empty=True)
            if call_id not in called:
                raise ValueError(f"{where}.tool_call_id {call_id!r} answers no tool call of an earlier "
                                 f"assistant message")
        called.update(ids)


def check_tools(tools) -> None:
    """Raise ValueError naming the field unless `tools` is None or a list of OpenAI function tools,
    {"type": "function", "function": {"name": str, "description": str, "parameters": {JSON schema}}},
    with distinct names matching [A-Za-z0-9_-]{1,64} (OpenAI's rule). description and parameters are
    optional; parameters, when given, is a JSON-schema object. Other keys are ignored (run_agent's
    dict form carries "callable"). Python callables are not schemas: turn them into schemas first
    (runtime.agent.tool_schema)."""
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of OpenAI function tools, got {_type(tools)}")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _mapping(tool, where, 'an OpenAI tool {"type": "function", "function": {"name": ...}}')
        if tool.get("type") != "function":
            raise ValueError(f'{where}.type must be "function" (an OpenAI tool is {{"type": "function", '
                             f'"function": {{"name": ..., "parameters": ...}}}}), got {tool.get("type")!r}')
        function = _mapping(tool.get("function"), f"{where}.function",
                            'a dict {"name": ..., "description": ..., "parameters": ...}')
        name = _string(function.get("name"), f"{where}.function.name", non_empty=True)
        if not TOOL_NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is declared twice (also tools[{seen[name]}])")
        seen[name] = i
        if function.get("description") is not None:
            _string(function["description"], f"{where}.function.description")
        if function.get("parameters") is not None:
            parameters = _mapping(function["parameters"], f"{where}.function.parameters", "a JSON-schema object")
            if parameters.get("type", "object") != "object":
                raise ValueError(f"{where}.function.parameters.type must be 'object', got {parameters['type']!r}")
