"""POST /v1/completions: raw prompts (text or token ids, one or a batch) -> one engine.generate stream."""

from __future__ import annotations

from functools import partial

import anyio
from fastapi import Request

from .common import ServerState, collect, sse, start
from .errors import ApiError
from .metrics import RequestTimer
from .openai_format import CompletionAccumulator, TokenText
from .schemas import CompletionRequest

_RENAMES = {"max_new_tokens": "max_tokens", "token_ids": "prompt", "stop_token_ids": "stop"}


def prompt_ids(engine, prompt) -> list[list[int]]:
    """The request's prompt(s) as token id lists, each checked against the vocabulary and the context."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt: empty", "prompt")
    out = []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        ids = engine.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, f"{where}: empty", "prompt")
        bad = [t for t in ids if not 0 <= t < engine.config.vocab_size]
        if bad:
            raise ApiError(400, f"{where}: token id {bad[0]} outside [0, vocab_size={engine.config.vocab_size})", "prompt")
        if len(ids) >= engine.max_seq_len:
            raise ApiError(400, f"{where}: {len(ids)} tokens; the context holds {engine.max_seq_len} with room for "
                           "at least one generated token", "prompt", "context_length_exceeded")
        out.append(ids)
    return out


async def completions(state: ServerState, body: CompletionRequest, request: Request):
    body.check()
    state.check_model(body.model)
    engine = state.host.require_engine()
    if body.n > engine.max_batch_size:
        raise ApiError(400, f"n={body.n}: at most max_batch_size={engine.max_batch_size}", "n")
    if any(isinstance(p, str) for p in ([body.prompt] if isinstance(body.prompt, str) else body.prompt)) \
            and engine.tokenizer is None:
        raise ApiError(400, "prompt: this checkpoint has no tokenizer; send token ids", "prompt")
    prompts = await anyio.to_thread.run_sync(prompt_ids, engine, body.prompt)
    sampling = {"temperature": body.temperature, "top_p": body.top_p, "min_p": body.min_p,
                "top_k": 0 if body.top_k == -1 else body.top_k, "repetition_penalty": body.repetition_penalty,
                "stop": body.stops, "max_new_tokens": body.max_tokens, "seed": body.seed}
    if body.logprobs is not None:
        sampling["logprobs"] = body.logprobs
    kwargs = {k: v for k, v in sampling.items() if v is not None}   # None: generation_config's default
    admission = state.host.admit(len(prompts) * body.n)
    batch = prompts[0] if len(prompts) == 1 else prompts
    stream = await start(admission, [partial(engine.generate, batch, n=body.n, stream=True, **kwargs)], _RENAMES)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    acc = CompletionAccumulator(state.model_name, [len(p) for p in prompts], body.n, include_usage,
                                body.logprobs is not None, TokenText(engine.tokenizer))
    timer = RequestTimer(state.metrics)

    def feed(_, delta):
        if delta.token_ids:
            timer.first_output()
        chunk = acc.feed(delta)
        return [chunk] if chunk["choices"][0]["text"] or delta.finish_reason or chunk["choices"][0]["logprobs"] else []

    def finish():
        u = acc.usage()
        timer.finish(u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"],
                     max(acc.tokens, default=0))

    if body.stream:
        return sse(state, stream, admission, acc, feed, finish)
    return await collect(request, stream, admission, feed, finish, acc.body)
