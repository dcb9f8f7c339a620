"""The agent loop: chat, call the tools, append their results, repeat.

Each round is a plain chat over the whole conversation, as an HTTP client would send it. There is
no cache bookkeeping here: the engine's prefix cache holds the previous rounds' blocks (prompt and
generated tokens alike), so a round prefills only what it appended, plus the partly filled last
block. A template that renders earlier turns differently from what the model wrote simply gets
fewer cached tokens; each step reports its own prefilled and cached counts.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Callable


_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def tool_schema(fn: Callable) -> dict:
    """An OpenAI tool schema from a Python function: name, the docstring's first paragraph as the
    description, parameters from the signature (JSON types from annotations; parameters without a
    default are required), per-parameter descriptions from "name: text" lines of an Args section."""
    doc = inspect.getdoc(fn) or ""
    described = dict(re.findall(r"^\s+(\w+)(?: \(.*?\))?: (.+)$", doc.partition("Args:")[2], flags=re.M))
    properties, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        prop = {"type": _PY_TO_JSON[p.annotation]} if p.annotation in _PY_TO_JSON else {}
        if name in described:
            prop["description"] = described[name]
        properties[name] = prop
        if p.default is p.empty:
            required.append(name)
    return {"type": "function", "function": {
        "name": fn.__name__, "description": doc.split("\n\n")[0].strip(),
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _tools(tools) -> tuple[list[dict], dict[str, Callable]]:
    """Schemas for the template and callables by name, from callables or {"type": "function",
    "function": {...}, "callable": fn} dicts."""
    schemas, functions = [], {}
    for tool in tools:
        if callable(tool):
            schema, fn = tool_schema(tool), tool
        elif isinstance(tool, dict) and callable(tool.get("callable")) and "function" in tool:
            schema, fn = {k: v for k, v in tool.items() if k != "callable"}, tool["callable"]
        else:
            raise ValueError(f"tools: {tool!r} is neither a callable nor an OpenAI tool dict with a 'callable'")
        schemas.append(schema)
        functions[schema["function"]["name"]] = fn
    return schemas, functions


def call_tool(functions: dict[str, Callable], call: dict) -> str:
    """Run one parsed tool call; any failure becomes an error text the model reads."""
    name = call["function"]["name"]
    if "error" in call:
        return f"Error: could not parse the call: {call['error']}"
    if name not in functions:
        return f"Error: unknown tool {name!r}; available: {', '.join(functions)}"
    try:
        result = functions[name](**json.loads(call["function"]["arguments"]))
    except Exception as e:  # the model sees the failure and may try again
        return f"Error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


@dataclass
class AgentStep:
    """One round: the assistant message it produced and the tool results fed back after it."""
    round: int
    prompt_tokens: int        # the rendered conversation, in tokens
    cached_tokens: int        # of those, how many the prefix cache served
    generated_tokens: int
    finish_reason: str        # the round's: "stop", "length" or "tool_calls"
    message: dict
    tool_results: list[dict] = field(default_factory=list)

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens this round ran through the model."""
        return self.prompt_tokens - self.cached_tokens


@dataclass
class AgentRun:
    messages: list[dict]      # the whole transcript, OpenAI format
    steps: list[AgentStep]
    finish_reason: str        # "answer", "max_tool_calls" or "length"

    @property
    def answer(self) -> dict:
        return self.messages[-1]


def run_agent(engine, messages: list[dict], tools, max_tool_calls: int = 300, on_step=None,
              seed: int | None = None, **chat_args) -> AgentRun:
    """See Engine.run_agent. Round r samples with seed + r when seed is set."""
    if not isinstance(max_tool_calls, int) or isinstance(max_tool_calls, bool) or max_tool_calls < 0:
        raise ValueError(f"max_tool_calls={max_tool_calls!r}: must be an integer >= 0")
    if "stream" in chat_args or "n" in chat_args:
        raise ValueError("run_agent takes neither stream nor n")
    schemas, functions = _tools(tools)
    messages = [dict(m) for m in messages]
    steps, calls = [], 0
    while True:
        reply = engine.chat(messages, schemas or None, seed=None if seed is None else seed + len(steps), **chat_args)
        usage = reply["usage"]
        message = {"role": "assistant", "content": reply["content"], "reasoning_content": reply["reasoning_content"]}
        if reply["tool_calls"]:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "error"} for c in reply["tool_calls"]]
        messages.append(message)
        step = AgentStep(len(steps), usage["prompt_tokens"], usage["cached_tokens"], usage["completion_tokens"],
                         reply["finish_reason"], message)
        steps.append(step)
        finish = ("length" if reply["finish_reason"] == "length" else "answer" if not reply["tool_calls"] else None)
        for call in reply["tool_calls"]:
            if calls == max_tool_calls:
                finish = "max_tool_calls"
                break
            result = {"role": "tool", "tool_call_id": call["id"], "content": call_tool(functions, call)}
            messages.append(result)
            step.tool_results.append(result)
            calls += 1
        if on_step is not None:
            on_step(step)
        if finish is not None:
            return AgentRun(messages, steps, finish)
