"""POST /v1/chat/completions: OpenAI chat requests -> engine.chat streams, one per choice."""

from __future__ import annotations

from functools import partial

import anyio
from fastapi import Request
from jinja2.exceptions import TemplateError

from .common import ServerState, collect, engine_error, render_chat, sse, start
from .errors import ApiError
from .metrics import RequestTimer
from .openai_format import ChatAccumulator, TokenText
from .schemas import ChatCompletionRequest, NamedToolChoice, text_of

# engine.chat / generate argument -> the request field it comes from (for the param of a 400)
_RENAMES = {"max_new_tokens": "max_tokens", "prompt": "messages", "token_ids": "messages", "stop_token_ids": "stop"}


def engine_messages(body: ChatCompletionRequest) -> list[dict]:
    """The request's messages as the plain dicts the chat template reads (content parts joined)."""
    out = []
    for m in body.messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content)}
        if getattr(m, "name", None):
            d["name"] = m.name
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                d["reasoning_content"] = reasoning
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def chat_arguments(state: ServerState, body: ChatCompletionRequest) -> dict:
    """engine.chat's keyword arguments for the request (all but messages, stream and seed); ApiError 400
    for what the request asks that the engine cannot do."""
    engine = state.host.engine
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    names = [t["function"]["name"] for t in tools or []]
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ApiError(400, f"tool_choice names function {choice.function.name!r}, which is not among "
                           f"tools ({', '.join(names) or 'none given'})", "tool_choice")
        choice = choice.model_dump()
    elif choice == "required" and not tools:
        raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice")
    if body.n > engine.max_batch_size:
        raise ApiError(400, f"n={body.n}: at most max_batch_size={engine.max_batch_size}", "n")
    kwargs = {"tools": tools, "thinking": body.chat_template_kwargs.thinking if body.chat_template_kwargs else True}
    if choice not in (None, "auto"):
        kwargs["tool_choice"] = choice
    if body.response_format is not None and body.response_format.type != "text":
        kwargs["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
    if body.parallel_tool_calls is not None:
        kwargs["parallel_tool_calls"] = body.parallel_tool_calls
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = {"temperature": body.temperature, "top_p": body.top_p, "min_p": body.min_p,
                "top_k": 0 if body.top_k == -1 else body.top_k, "repetition_penalty": body.repetition_penalty,
                "stop": body.stops, "max_new_tokens": max_tokens}
    if body.logprobs:
        sampling["logprobs"] = body.top_logprobs or 0
    # None: the checkpoint's generation_config default, which the engine applies when the argument is absent.
    kwargs.update({k: v for k, v in sampling.items() if v is not None})
    return kwargs


async def chat_completions(state: ServerState, body: ChatCompletionRequest, request: Request):
    body.check()
    state.check_model(body.model)
    engine = state.host.require_engine()
    kwargs = chat_arguments(state, body)
    messages = engine_messages(body)
    try:   # rendering and tokenizing a long history takes a while: off the event loop
        prompt = await anyio.to_thread.run_sync(
            partial(render_chat, engine, messages, kwargs["tools"], kwargs["thinking"]))
    except ValueError as e:
        raise engine_error(e, _RENAMES) from None
    except TemplateError as e:   # the template's raise_exception(), or messages it cannot render
        raise ApiError(400, f"messages: the chat template cannot render them: {e}", "messages") from None
    if len(prompt) >= engine.max_seq_len:
        raise ApiError(400, f"messages: the prompt has {len(prompt)} tokens; the context holds {engine.max_seq_len} "
                       "with room for at least one generated token", "messages", "context_length_exceeded")
    admission = state.host.admit(body.n)
    # One engine request per choice: choice j samples with seed + j, as the engine's own n does, so a
    # seeded request gives the same choices whether or not other requests share its batches.
    factories = [partial(engine.chat, messages, stream=True,
                         **({"seed": body.seed + j} if body.seed is not None else {}), **kwargs)
                 for j in range(body.n)]
    stream = await start(admission, factories, _RENAMES)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    acc = ChatAccumulator(state.model_name, body.n, include_usage, TokenText(engine.tokenizer),
                          max_tool_calls=1 if body.parallel_tool_calls is False else None)
    timer = RequestTimer(state.metrics)

    def feed(index, item):
        if any(k in item for k in ("content", "reasoning_content", "tool_calls")):
            timer.first_output()
        return acc.feed(index, item)

    def finish():
        done = [c.usage for c in acc.choices if c.usage]
        timer.finish(sum(u["prompt_tokens"] for u in done), sum(u.get("cached_tokens", 0) for u in done),
                     sum(u["completion_tokens"] for u in done), max((u["completion_tokens"] for u in done), default=0))

    if body.stream:
        return sse(state, stream, admission, acc, feed, finish)
    return await collect(request, stream, admission, feed, finish, acc.body)
