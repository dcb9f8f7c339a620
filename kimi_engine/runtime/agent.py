"""The agent loop: generate, call tools, feed their results back, repeat — over one KV cache.

Each round renders the whole conversation through the chat template, checks that the tokens the
cache already holds are a prefix of it, and prefills only what was appended (the tool results and
the next generation prompt). When the template renders the earlier turns differently from what
the model generated (it may re-tokenize them), the conversation is prefilled again and counted.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Callable

from ..chat.parser import parse_assistant
from .generation import Generation, Request
from .sampling import SamplingParams

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


def run_tool(engine, functions: dict[str, Callable], call: dict) -> str:
    """call_tool, once per call however many ranks run the engine: under tensor parallelism rank 0 runs
    the tool and every rank reads its result (a tool may have side effects, and ranks fed different
    results would prefill different tokens into the same collectives)."""
    parallel = engine.model.parallel
    if parallel is None:
        return call_tool(functions, call)
    outcome = None
    if parallel.rank == 0:
        try:
            outcome = ("result", call_tool(functions, call))
        except BaseException as e:   # every rank must reach the broadcast, then every rank raises
            outcome = ("error", f"{type(e).__name__}: {e}")
    kind, text = parallel.broadcast_object(outcome)
    if kind == "error":
        raise RuntimeError(f"tool call {call.get('function', {}).get('name')!r} failed on rank 0: {text}")
    return text


@dataclass
class AgentStep:
    """One round: the assistant message it produced and the tool results fed back after it."""
    round: int
    prompt_tokens: int        # the rendered conversation, in tokens
    prefilled_tokens: int     # of those, how many this round ran through the model
    generated_tokens: int
    reprefilled: bool         # the cache could not be reused (the template re-rendered earlier turns)
    message: dict
    tool_results: list[dict] = field(default_factory=list)


@dataclass
class AgentRun:
    messages: list[dict]      # the whole transcript, OpenAI format
    steps: list[AgentStep]
    finish_reason: str        # "answer", "max_tool_calls" or "length"

    @property
    def answer(self) -> dict:
        return self.messages[-1]


def run_agent(engine, messages: list[dict], tools, max_tool_calls: int = 300, on_step=None,
              max_new_tokens: int = 4096, seed: int | None = None, logits_processors=None, **sampling) -> AgentRun:
    if engine.tokenizer is None:
        raise ValueError("run_agent needs a tokenizer; this checkpoint has none")
    schemas, functions = _tools(tools)
    params = SamplingParams(**sampling)
    messages = [dict(m) for m in messages]
    cache = engine.new_cache()
    seq, cached_ids, steps, calls = cache.add_sequence(), [], [], 0
    while True:
        prompt_ids = engine.tokenizer.apply_chat_template(messages, schemas or None, add_generation_prompt=True)
        reprefilled = bool(cached_ids) and prompt_ids[:len(cached_ids)] != cached_ids
        if reprefilled:
            cache.free(seq)
            seq, cached_ids = cache.add_sequence(), []
        before = engine.stats.prefill_tokens
        run = Generation(engine, [Request(prompt_ids, seq, len(cached_ids))], params, n=1,
                         max_new_tokens=max_new_tokens, seed=None if seed is None else seed + len(steps),
                         stop=[], stop_token_ids=engine.stop_ids(), logits_processors=logits_processors,
                         cache=cache, free_finished=False)
        for _ in run:
            pass
        completion = run.completions()[0][0]
        cached_ids = (prompt_ids + completion.token_ids)[:cache.length(seq)]   # the last token was never fed
        parsed = parse_assistant(completion.text)
        message = {"role": "assistant", "content": parsed["content"], "reasoning_content": parsed["reasoning_content"]}
        if parsed["tool_calls"]:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "error"} for c in parsed["tool_calls"]]
        messages.append(message)
        step = AgentStep(len(steps), len(prompt_ids), engine.stats.prefill_tokens - before,
                         completion.completion_tokens, reprefilled, message)
        steps.append(step)
        finish = ("length" if completion.finish_reason == "length" else "answer" if not parsed["tool_calls"]
                  else None)
        for call in parsed["tool_calls"]:
            if calls == max_tool_calls:
                finish = "max_tool_calls"
                break
            result = {"role": "tool", "tool_call_id": call["id"], "content": run_tool(engine, functions, call)}
            messages.append(result)
            step.tool_results.append(result)
            calls += 1
        if on_step is not None:
            on_step(step)
        if finish is not None:
            return AgentRun(messages, steps, finish)
