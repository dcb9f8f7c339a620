"""Engine: the public facade. A loaded model, one long-lived scheduler over one paged latent cache
(with the prefix cache), and the calls users make: generate, chat, run_agent, logits.

Every call is requests on the one scheduler, so calls from several threads share batches and a
conversation resent round after round prefills only what is new. Nobody owns a stepping thread:
whichever caller is waiting for output and finds no one stepping runs the next step (for everyone),
so there is no background thread to start, stop or leak, and an error in a step surfaces in a
caller's thread.

Under tensor parallelism only rank 0 schedules. Its public calls run as usual and broadcast each
step's plan; on the other ranks the same public call follows those plans (runner.follow) and then
returns rank 0's result, so "every rank makes the same calls" keeps working. `follow()` is that
loop without a call of its own (a server's other ranks run it until rank 0 calls `close()`).
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Iterator

import torch

from .. import ops
from ..cache import LatentCache
from ..chat.parser import THINK_BEGIN, THINK_END, StreamParser, parse_assistant
from ..checkpoint import load_model
from ..config import ModelConfig, read_generation_config
from ..kernels.mla_decode import check_fp8_kv_device
from ..model import Transformer
from ..chat.tokenizer import load_tokenizer
from ..chat.validate import check_messages, check_tools
from .agent import AgentRun, run_agent
from .blocks import BlockManager
from .cuda_graphs import DecodeGraphs, check_not_parallel
from .request import Completion, Delta, LogitsProcessor, Request
from .runner import Prefill, Runner, StepPlan
from .sampling import SamplingParams
from .scheduler import RequestState, Scheduler, SchedulerStats

SAMPLING_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


def aggregation_request(drafts: list[dict]) -> str:
    """Heavy mode's last turn: the n drafts, and the request to combine them into one answer."""
    parts = [f"You wrote {len(drafts)} independent drafts for the last request. Compare them, keep what is "
             "right, fix what is wrong, and write one final answer."]
    for i, d in enumerate(drafts, 1):
        parts.append(f"## Draft {i}\n{d['content'].strip() or '(no answer)'}")
    return "\n\n".join(parts)


def _mirrored(method):
    """A public call that every rank makes: rank 0 runs it and broadcasts the result; the other ranks
    follow rank 0's steps meanwhile and return that result. Streams are mirrored as their full list
    of items. Calls made inside a mirrored call (chat -> generate) run as plain calls."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.runner.parallel is None or self._mirror_depth or self._leading:
            return method(self, *args, **kwargs)
        if self.runner.parallel.rank != 0:
            outcome = self.runner.follow()
            if outcome[0] == "error":
                raise RuntimeError(f"{method.__name__} failed on rank 0: {outcome[1]}")
            return iter(outcome[1]) if outcome[0] == "stream" else outcome[1]
        self._mirror_depth += 1
        try:
            result = method(self, *args, **kwargs)
            if isinstance(result, Iterator):
                items = list(result)       # every rank must see the whole stream: it is run to the end here
                self.runner.stop_followers(("stream", items))
                return iter(items)
            self.runner.stop_followers(("result", result))
            return result
        except BaseException as e:
            self.runner.stop_followers(("error", f"{type(e).__name__}: {e}"))
            raise
        finally:
            self._mirror_depth -= 1
    return call


class Engine:
    """A model ready to run. Build it with `kimi_engine.load`.

    Attributes: config (ModelConfig), model (Transformer), tokenizer (None when the checkpoint has no
    tokenizer files), device, dtype, max_seq_len, max_batch_size, generation_defaults (sampling
    arguments from generation_config.json), blocks (the BlockManager), runner, scheduler.
    """

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer=None, *, max_seq_len: int,
                 max_batch_size: int, prefill_chunk: int = 2048, kv_fp8: bool = False, cuda_graphs: bool = False,
                 prefix_cache: bool = True, kv_cache_tokens: int | None = None, generation_defaults: dict | None = None):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.prefill_chunk, self.kv_fp8 = prefill_chunk, kv_fp8
        self.generation_defaults = {**SAMPLING_DEFAULTS, **(generation_defaults or {})}
        pools = LatentCache(config, self.device, self.dtype, fp8=kv_fp8)
        self.kv_cache_tokens = kv_cache_tokens or default_kv_cache_tokens(self.device, pools.bytes_per_token(),
                                                                          max_batch_size, max_seq_len)
        max_blocks = max(1, self.kv_cache_tokens // pools.block_size)
        self.blocks = BlockManager(pools, max_blocks, prefix_cache)
        graphs = None
        if cuda_graphs:
            if self.device.type == "cuda":
                self.blocks.reserve(max_blocks)   # the pools never move: graphs are captured once
            scratch = self.blocks.add_sequence()   # the padding rows' block, never freed
            b = self.blocks.prepare([scratch], 1, device="cpu")
            graphs = DecodeGraphs(model, pools, max_batch_size, max_seq_len, (int(b.block_table[0, 0]), int(b.slots[0, 0])))
        self.graphs = graphs
        self.runner = Runner(model, pools, graphs)
        self.scheduler = Scheduler(self.runner, self.blocks, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                   step_tokens=prefill_chunk, tokenizer=tokenizer, vocab_size=config.vocab_size)
        self._cond = threading.Condition()
        self._stepping = False
        self._mirror_depth = 0
        self._leading = False     # rank 0 alone takes requests (see lead())
        self._grammars = None     # the GrammarCompiler, built on first use

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    @property
    def stats(self) -> SchedulerStats:
        """Totals since load: prefill_tokens, decode_tokens, cached_tokens, evicted_blocks, preemptions."""
        return self.scheduler.stats

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ------------------------------------------------------------------------------ stepping
    def _take_step_role(self, block: bool) -> bool:
        with self._cond:
            while self._stepping:
                if not block:
                    return False
                self._cond.wait()
            self._stepping = True
            return True

    def _release_step_role(self) -> None:
        with self._cond:
            self._stepping = False
            self._cond.notify_all()

    def _step(self) -> None:
        try:
            with torch.inference_mode():
                self.scheduler.step()
        except BaseException as e:
            self.scheduler.fail_all(e)    # nothing is left half-scheduled: every request in flight ends
            raise

    def _results(self, states: list[RequestState]) -> Iterator[Delta]:
        """The deltas of `states` as steps produce them; this caller steps whenever nobody else does.
        Closing or dropping the iterator aborts the requests not yet done and frees their blocks."""
        live = list(states)
        try:
            while live:
                out = []
                for st in live:
                    while st.outputs:
                        out.append(st.outputs.popleft())
                    if st.error is not None and not st.outputs:
                        raise st.error
                live = [st for st in live if not st.done or st.outputs]
                if out:
                    yield from out
                    continue
                if not live:
                    break
                if self._take_step_role(block=False):
                    try:
                        if not any(st.outputs or st.done for st in live):
                            if not self.scheduler.has_work():
                                raise RuntimeError("the scheduler went idle with requests unfinished")
                            self._step()
                    finally:
                        self._release_step_role()
                else:
                    with self._cond:
                        if self._stepping:
                            self._cond.wait(timeout=0.05)
        finally:
            unfinished = [st for st in states if not st.done]
            if unfinished:
                for st in unfinished:
                    self.scheduler.abort(st.request.request_id)
                if self._take_step_role(block=True):   # free their blocks now, not at the next step
                    try:
                        self.scheduler.drain_inbox()
                    finally:
                        self._release_step_role()

    def lead(self) -> None:
        """Rank 0 of a tensor-parallel engine: from now on rank 0 alone takes requests (a server) and the
        other ranks run follow(); calls are no longer mirrored, so streams stream."""
        self._leading = True

    def follow(self) -> None:
        """Ranks other than 0 of a tensor-parallel engine: run rank 0's steps until it calls close()."""
        while self.runner.follow() != ("closed", None):
            pass   # the end of one of rank 0's mirrored calls: keep following

    def close(self) -> None:
        """Rank 0 of a tensor-parallel engine: release the ranks in follow(). Elsewhere nothing to do."""
        if self.runner.parallel is not None and self.runner.parallel.rank == 0:
            self.runner.stop_followers(("closed", None))
            self._leading = False

    # ------------------------------------------------------------------------------ low level
    # A private cache driven by hand, apart from the scheduler: what benchmarks and model tests use
    # to time or check one prefill or one decode step. Serving calls never touch it.
    def new_cache(self, block_size: int = 64, fp8: bool | None = None, max_tokens: int | None = None) -> BlockManager:
        """A paged cache of its own pools (no prefix cache) for prefill() and decode_step()."""
        pools = LatentCache(self.config, self.device, self.dtype, block_size, self.kv_fp8 if fp8 is None else fp8)
        return BlockManager(pools, None if max_tokens is None else max_tokens // block_size, prefix_cache=False)

    @torch.inference_mode()
    def prefill(self, cache: BlockManager, seq: int, token_ids, all_logits: bool = False) -> torch.Tensor:
        """Append token_ids to sequence `seq` of a new_cache(), prefill_chunk tokens per forward pass ->
        the last position's logits [V] (every position's [len, V] with all_logits), float32."""
        ids = self.check_tokens(token_ids)
        if cache.length(seq) + len(ids) > self.max_seq_len:
            raise ValueError(f"{cache.length(seq)} cached + {len(ids)} new tokens exceed max_seq_len={self.max_seq_len}")
        out = []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            batch = cache.prepare([seq], len(chunk))
            logits = self.model(torch.tensor([chunk], device=self.device), batch, cache.pools, last_only=not all_logits)
            out.append(logits[0].float())
        return torch.cat(out) if all_logits else out[-1][-1]

    @torch.inference_mode()
    def decode_step(self, cache: BlockManager, seq_ids: list[int], tokens) -> torch.Tensor:
        """One new token for each sequence of a new_cache() -> next-token logits [len(seq_ids), V] float32."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        return self.model(tokens, cache.prepare(seq_ids, 1), cache.pools)[:, -1].float()

    # ------------------------------------------------------------------------------ calls
    @_mirrored
    def logits(self, token_ids) -> torch.Tensor:
        """float32 [len(token_ids), vocab]: every position's next-token logits, from one prefill."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.flatten().tolist()
        if not _is_ids(token_ids, allow_empty=True):
            raise ValueError(f"token_ids: expected a list of token ids, got {type(token_ids).__name__}")
        ids = self.check_tokens(token_ids)
        self._take_step_role(block=True)
        try:
            blocks = self.blocks
            seq = blocks.add_sequence()
            try:
                out = []
                for start in range(0, len(ids), self.prefill_chunk):
                    chunk = ids[start:start + self.prefill_chunk]
                    plan = StepPlan(0, prefills=[Prefill(chunk, blocks.prepare([seq], len(chunk), device="cpu"), True)])
                    plan.num_blocks, plan.copies = blocks.pools.num_blocks, blocks.take_copies()
                    out.append(self.runner.execute(plan)[1][0])
                    self.scheduler.stats.prefill_tokens += len(chunk)
                blocks.commit(seq, ids)
                return torch.cat(out)
            finally:
                blocks.free(seq)
        finally:
            self._release_step_role()

    def greedy(self, token_ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one tokenized prompt; only the new ids, an eos id ending them."""
        return self.generate(list(token_ids), max_new_tokens=max_new_tokens, temperature=0.0).token_ids

    @_mirrored
    def generate(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None, n: int = 1,
                 stream: bool = False, logits_processors: list[LogitsProcessor] | None = None,
                 logprobs: int | None = None, json_schema=None, regex: str | None = None, grammar: str | None = None):
        """Generate from a prompt (str or list of token ids) or a batch of them (a list of those).

        Returns a Completion (text, token_ids, finish_reason, prompt_tokens, cached_tokens,
        completion_tokens, logprobs); a list of them for a batch or for n > 1 (a list of lists for
        both). stream=True returns an iterator of Delta (prompt, sample, text, token_ids,
        finish_reason, logprobs, and on each path's last delta its Completion) whose text pieces add
        up to the Completion's text; closing or dropping it aborts the request.
        Sampling arguments left None take the checkpoint's generation_config.json values (then
        temperature 1, top_p 1, top_k 0, min_p 0, repetition_penalty 1; max_new_tokens 256).
        Generation ends at the eos tokens, stop_token_ids, a stop string (not in the text), the end
        of a grammar, or max_new_tokens. seed: path j of every prompt uses seed + j, alone or in any
        batch. n > 1 prefills the prompt once and forks its cache ("heavy mode"). logprobs=k reports
        each token's log-probability and the k most likely alternatives. json_schema / regex /
        grammar constrain the output (runtime/grammar.py). Raises ValueError naming the argument
        before any work.
        """
        constraint = self._grammar(json_schema=json_schema, regex=regex, grammar=grammar)
        return self._submit(prompt, stream, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                            stop_token_ids=stop_token_ids, logits_processors=logits_processors, logprobs=logprobs,
                            grammar=constraint)

    def _submit(self, prompt, stream: bool, *, n: int, **fields):
        """Validate every prompt's request, then queue them all: Completion(s), or the Delta stream."""
        single = isinstance(prompt, str) or _is_ids(prompt)
        if not single and not (isinstance(prompt, list) and prompt):
            raise ValueError(f"prompt: expected a str, a list of token ids, or a non-empty list of those; "
                             f"got {_describe(prompt)}")
        prompts = [prompt] if single else prompt
        requests = [self._request(self._encode(p, i, single), n=n, **fields) for i, p in enumerate(prompts)]
        states = [self.scheduler.add_request(r, i) for i, r in enumerate(requests)]
        deltas = self._results(states)
        if stream:
            return deltas
        for _ in deltas:
            pass
        out = [st.completions[0] if n == 1 else st.completions for st in states]
        return out[0] if single else out

    def _request(self, prompt_ids: list[int], *, n=1, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
                 min_p=None, repetition_penalty=None, seed=None, stop=None, stop_token_ids=None,
                 logits_processors=None, logprobs=None, grammar=None) -> Request:
        d = self.generation_defaults
        pick = lambda value, name: d[name] if value is None else value   # noqa: E731
        params = SamplingParams(pick(temperature, "temperature"), pick(top_p, "top_p"), pick(top_k, "top_k"),
                                pick(min_p, "min_p"), pick(repetition_penalty, "repetition_penalty"))
        max_new_tokens = d.get("max_new_tokens", 256) if max_new_tokens is None else max_new_tokens
        if not _is_int(n) or not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n={n!r}: must be an integer in [1, max_batch_size={self.max_batch_size}]")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed={seed!r}: must be an integer or None")
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs={logprobs!r}: must be None or an integer in [0, 20]")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={stop!r}: stop strings must be non-empty strings")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none (use stop_token_ids)")
        if stop_token_ids is not None and not _is_ids(stop_token_ids, allow_empty=True):
            raise ValueError(f"stop_token_ids={stop_token_ids!r}: must be a list of token ids")
        processors = list(logits_processors or [])
        if not all(callable(p) for p in processors):
            raise ValueError("logits_processors: each must be callable as fn(generated_ids, logits_row) -> logits_row")
        self.check_tokens(prompt_ids)
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_seq_len={self.max_seq_len} leaves no room "
                             "to generate")
        return Request(prompt_ids, params, max_new_tokens, n, seed, stop, frozenset(self.stop_ids(stop_token_ids)),
                       processors, logprobs, grammar)

    def _grammar(self, **constraints):
        """The compiled Grammar for generate's or chat's constraints (None when nothing constrains)."""
        if all(v is None for v in constraints.values()):
            return None
        if self.tokenizer is None:
            raise ValueError(f"{next(k for k, v in constraints.items() if v is not None)}: constrained decoding "
                             "needs a tokenizer; this checkpoint has none")
        if self._grammars is None:   # built on first use: it reads the whole vocabulary
            from .grammar import GrammarCompiler
            self._grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size, eos_token_ids=self.stop_ids())
        return self._grammars.compile(**constraints)

    def check_tokens(self, token_ids) -> list[int]:
        """token_ids as a list of ints; ValueError if empty, out of vocabulary or too long."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("token_ids is empty")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"{len(ids)} tokens exceed max_seq_len={self.max_seq_len}")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size={self.config.vocab_size})")
        return ids

    def _encode(self, prompt, index: int, single: bool) -> list[int]:
        where = "prompt" if single else f"prompt[{index}]"
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where}: a text prompt needs a tokenizer; this checkpoint has none (pass token ids)")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError(f"{where} is empty")
            return ids
        if not _is_ids(prompt):
            raise ValueError(f"{where}: expected a str or a list of token ids, got {_describe(prompt)}")
        return list(prompt)

    def stop_ids(self, extra: list[int] | None = None) -> set[int]:
        """Token ids that end generation: the config's eos ids, the tokenizer's eos and [EOS], and `extra`."""
        ids = set(self.config.eos_token_ids) | set(extra or [])
        if self.tokenizer is not None:
            ids |= {i for i in (self.tokenizer.eos_token_id, self.tokenizer.token_to_id("[EOS]")) if i is not None}
        return ids

    # ------------------------------------------------------------------------------ chat
    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = True) -> list[int]:
        """The prompt token ids of one assistant turn for OpenAI-format messages and tool schemas."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this checkpoint has none")
        check_messages(messages)
        check_tools(tools)
        ids = self.tokenizer.apply_chat_template(messages, tools or None, add_generation_prompt=True)
        if not thinking:  # an empty reasoning block: the model goes straight to the answer
            ids += self.tokenizer.encode(THINK_BEGIN + THINK_END)
        return ids

    @_mirrored
    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice="auto", response_format=None,
             thinking: bool = True, stream: bool = False, n: int = 1, aggregate: bool = False,
             max_new_tokens: int | None = None, parallel_tool_calls: bool = True, **sampling):
        """One assistant turn for OpenAI-format messages (and tool schemas) -> an assistant message
        {"role", "content", "reasoning_content", "tool_calls"} (plus "finish_reason" and "usage").

        thinking=False closes the reasoning block in the prompt, so the model answers directly.
        tool_choice ("auto", "none", "required", or {"type": "function", "function": {"name": ...}})
        and response_format ({"type": "json_object"} / {"type": "json_schema", ...}) constrain the
        turn (runtime/grammar.py); parallel_tool_calls=False allows one call a turn under a grammar.
        stream=True yields {"reasoning_content": ...}, {"content": ...},
        {"tool_calls": [...]} deltas (each call once complete), {"logprobs": [...]} when asked, and
        last {"finish_reason", "usage"}. n > 1 returns n messages from one prefill ("heavy mode");
        with aggregate=True the model then combines them into one answer, returned with "drafts".
        sampling: generate's arguments (temperature, top_p, top_k, min_p, seed, logprobs, ...).
        """
        prompt = self.chat_prompt(messages, tools, thinking)
        constraint = self._chat_grammar(tools, tool_choice, response_format, thinking, messages, parallel_tool_calls)
        if max_new_tokens is None:
            max_new_tokens = self.generation_defaults.get("max_new_tokens", 4096)
        for key in ("json_schema", "regex", "grammar"):
            if key in sampling:
                raise ValueError(f"chat takes response_format and tool_choice, not {key}")
        if stream and n != 1:
            raise ValueError("stream=True takes n=1")
        out = self._submit(prompt, stream, n=n, max_new_tokens=max_new_tokens, grammar=constraint, **sampling)
        if stream:
            return self._stream_chat(out, thinking)
        drafts = [_chat_message(c, thinking) for c in (out if n > 1 else [out])]
        if n == 1:
            return drafts[0]
        if not aggregate:
            return drafts
        combined = self.chat(messages + [{"role": "user", "content": aggregation_request(drafts)}], tools, thinking=thinking,
                             max_new_tokens=max_new_tokens, parallel_tool_calls=parallel_tool_calls, **sampling)
        return {**combined, "drafts": drafts}

    def _chat_grammar(self, tools, tool_choice, response_format, thinking, messages, parallel_tool_calls=True):
        """The grammar a chat turn must follow, or None when nothing constrains it."""
        strict = any(isinstance(t, dict) and (t.get("function") or {}).get("strict") for t in tools or [])
        if tool_choice in ("auto", None) and not strict and response_format in (None, {"type": "text"}):
            return None
        earlier_calls = sum(len(m.get("tool_calls") or []) for m in messages if isinstance(m, dict))
        return self._grammar(tools=tools, tool_choice=tool_choice, response_format=response_format,
                             thinking=thinking, first_call_index=earlier_calls, parallel_tool_calls=parallel_tool_calls)

    @staticmethod
    def _stream_chat(deltas: Iterator[Delta], thinking: bool) -> Iterator[dict]:
        parser = StreamParser(thinking)
        completion = None
        for delta in deltas:
            yield from parser.feed(delta.text)
            if delta.logprobs:
                yield {"logprobs": delta.logprobs}
            if delta.completion is not None:
                completion = delta.completion
        yield from parser.close()
        message = parser.message
        yield {"finish_reason": _chat_finish(completion, message), "usage": _usage(completion)}

    @_mirrored
    def run_agent(self, messages: list[dict], tools, max_tool_calls: int = 300, on_step=None, **sampling) -> AgentRun:
        """Generate, run the tool calls (Python callables, or OpenAI tool dicts with a "callable"),
        append their results, and repeat until an answer without tool calls or max_tool_calls.

        Each round is a plain chat over the whole conversation; the prefix cache makes it prefill
        only what the round appended. Returns an AgentRun (messages, steps, finish_reason);
        on_step(step) sees each round.
        """
        return run_agent(self, messages, tools, max_tool_calls, on_step, **sampling)


def _chat_message(completion: Completion, thinking: bool) -> dict:
    message = parse_assistant(completion.text, thinking)
    message["finish_reason"] = _chat_finish(completion, message)
    message["usage"] = _usage(completion)
    if completion.logprobs is not None:
        message["logprobs"] = completion.logprobs
    return message


def _chat_finish(completion: Completion | None, message: dict) -> str:
    if completion is not None and completion.finish_reason == "length":
        return "length"
    return "tool_calls" if message.get("tool_calls") else "stop"


def _usage(c: Completion | None) -> dict:
    if c is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "cached_tokens": c.cached_tokens}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_ids(x, allow_empty: bool = False) -> bool:
    return isinstance(x, list) and (allow_empty or bool(x)) and all(_is_int(t) for t in x)


def _describe(x) -> str:
    if isinstance(x, list):
        kinds = sorted({type(t).__name__ for t in x})
        return f"a list of {', '.join(kinds)}" if x else "an empty list"
    return type(x).__name__


def default_kv_cache_tokens(device: torch.device, bytes_per_token: int, max_batch_size: int, max_seq_len: int) -> int:
    """The cache budget when load() is not given one: 90% of the device memory free after the weights
    (CUDA), or half of the host's available memory (CPU), in tokens; at most 4 x max_batch_size x
    max_seq_len (room for every batch slot's longest sequence plus as much again, three times over,
    for cached prefixes). On the CPU the pools grow lazily, so an unused budget costs nothing."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] * 0.9
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5
        except (ValueError, OSError):
            free = 8 << 30
    return max(1, min(int(free // bytes_per_token), 4 * max_batch_size * max_seq_len))


def load(path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
         max_seq_len: int | None = None, max_batch_size: int = 8, progress: bool = True,
         prefill_chunk: int = 2048, kv_fp8: bool = False, parallel=None, cuda_graphs: bool = False,
         prefix_cache: bool = True, kv_cache_tokens: int | None = None, threads: int | None = None) -> Engine:
    """Load a checkpoint directory (see checkpoint.py) into an Engine.

    device: default CUDA when available, else CPU. dtype: bfloat16, float16 or float32.
    max_seq_len: the longest sequence (default: the config's max_position_embeddings).
    max_batch_size: sequences decoded together (queued beyond). prefill_chunk: the token budget of one
    scheduler step (prompt chunks plus decode tokens). kv_fp8: store the latent cache as fp8 (e4m3).
    prefix_cache: keep finished sequences' full blocks for reuse by any request that starts the same
    way. kv_cache_tokens: the most tokens the cache holds, running sequences and cached prefixes
    together (default: see default_kv_cache_tokens).
    parallel: a kimi_engine.parallel.Parallel to load this rank's shard of a tensor/expert-parallel
    model; None: the whole model here. cuda_graphs: decode steps replay CUDA graphs, captured once
    per batch-size bucket (cuda_graphs.py); needs the Triton kernels and INT4 experts.
    threads (CPU): the threads of the CPU kernels and of torch (default: the CPUs this process may
    run on); decode-only steps run torch's small ops (sampling too) on one thread whatever the
    setting (ops.small_ops_threads).
    """
    for name, value in (("max_batch_size", max_batch_size), ("prefill_chunk", prefill_chunk)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if kv_cache_tokens is not None and (not _is_int(kv_cache_tokens) or kv_cache_tokens < 1):
        raise ValueError(f"kv_cache_tokens={kv_cache_tokens!r} must be a positive integer or None")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype={dtype}: must be torch.bfloat16, torch.float16 or torch.float32")
    device = _device(device)
    if device.type == "cpu":
        ops.set_threads(threads)
    elif threads is not None:
        raise ValueError(f"threads={threads!r}: only for a CPU device")
    if path is None:  # the built-in demo model, shipped as package data (kimi_engine/demo/)
        from ..demo import demo_path
        path = demo_path()
    # Mistakes that would otherwise surface only after hundreds of GB have loaded:
    if cuda_graphs:
        check_not_parallel(parallel)
    if parallel is not None and parallel.world_size > 1:
        local = os.environ.get("LOCAL_RANK")
        if device.type == "cuda" and local is not None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index != int(local):
                raise ValueError(f"rank {parallel.rank} would load onto cuda:{index} but LOCAL_RANK={local}: call "
                                 "torch.cuda.set_device(LOCAL_RANK) first (Parallel.from_env does), or pass device=")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine (torch {torch.__version__})")
    if kv_fp8 and ops.kernel_mode() != "torch":
        check_fp8_kv_device(device)
    tokenizer = load_tokenizer(path)  # first: a broken tokenizer file fails before any weights load
    defaults = read_generation_config(path)
    model, config = load_model(path, device=device, dtype=dtype, progress=progress, parallel=parallel)
    max_seq_len = max_seq_len or config.max_position_embeddings
    if not 0 < max_seq_len <= config.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} must lie in [1, max_position_embeddings={config.max_position_embeddings}]")
    return Engine(model, config, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                  prefill_chunk=prefill_chunk, kv_fp8=kv_fp8, cuda_graphs=cuda_graphs, prefix_cache=prefix_cache,
                  kv_cache_tokens=kv_cache_tokens, generation_defaults=defaults)


def _device(device) -> torch.device:
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: kimi-engine runs on 'cpu' or 'cuda'")
    return device
