"""The scheduler: one long-lived queue of requests, stepped one forward pass at a time.

Each request has n sampling paths (Sequence), each a sequence in the block manager. A sequence
holds its tokens (prompt, then generated) and how many of them the cache already has; the next
forward pass feeds it the rest. That one rule covers every state: a new prompt (its cached prefix
skipped), a chunk of a long prompt, a decode step (one token pending), and a sequence recomputed
after preemption (all of its tokens pending, the cached prefix again skipped).

A step, under a token budget (`step_tokens`):
  1. every running sequence with one token pending decodes, all in one batch; when their new blocks
     cannot be had, the youngest running sequence is preempted (its blocks freed, its tokens kept;
     it waits at the front of the queue and is recomputed later, usually mostly from the prefix
     cache) until they can;
  2. what is left of the budget goes to prompt chunks, oldest first, then to admitting waiting
     requests (while the batch has room for their n paths), so a 30k-token prompt arriving while
     others decode costs them one chunk of latency per step, never a stall;
  3. the runner runs the plan; sequences whose tokens are all in now sample their next token. A
     request of n paths forks its first sequence n - 1 times once the prompt is in (the forks
     share its blocks) and every path samples from the same logits with its own generator.
Finished sequences release their blocks at once; their full blocks stay in the prefix cache.

The scheduler is not thread-safe by itself: add_request and abort only queue work (thread-safe),
and one thread at a time calls step() (the engine sees to that).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .. import ops
from .blocks import BlockManager
from .request import Completion, Delta, Request, TextStream
from .runner import Prefill, Runner, StepPlan
from .sampling import make_generator, sample


@dataclass
class SchedulerStats:
    """Totals since the engine was built: tokens run through prefill passes and decode passes, prompt
    tokens served from the prefix cache, blocks evicted from it, sequences preempted."""
    prefill_tokens: int = 0
    decode_tokens: int = 0
    cached_tokens: int = 0
    evicted_blocks: int = 0
    preemptions: int = 0


class RequestState:
    """A submitted request as the caller sees it: deltas to read, done, or an error to raise."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.outputs: deque[Delta] = deque()   # appended by the stepping thread, popped by the caller
        self.done = False
        self.error: BaseException | None = None
        self.cached_tokens = 0
        self.completions: list[Completion | None] = [None] * request.n
        self.sequences: list[Sequence] = []
        self.forks_pending = request.n - 1      # paths still to fork off the first, once the prompt is in


@dataclass(eq=False)
class Sequence:
    state: RequestState
    sample: int
    tokens: list[int]
    arrival: int                              # admission order: the youngest is preempted first
    generator: torch.Generator
    text: TextStream
    budget: int                               # tokens it may still generate
    seq: int | None = None                    # its block-manager sequence while it holds blocks
    num_cached: int = 0                       # tokens whose latents are in the cache
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    seen: torch.Tensor | None = None          # [V] bool, for the repetition penalty
    matcher: object | None = None             # grammar matcher
    finish_reason: str | None = None

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_cached


class Scheduler:
    def __init__(self, runner: Runner, blocks: BlockManager, *, max_batch_size: int, max_seq_len: int,
                 step_tokens: int, tokenizer=None, vocab_size: int):
        self.runner, self.blocks, self.tokenizer = runner, blocks, tokenizer
        self.max_batch_size, self.max_seq_len, self.step_tokens = max_batch_size, max_seq_len, step_tokens
        self.vocab_size = vocab_size
        self.stats = SchedulerStats()
        self.inbox: deque = deque()      # ("add", state) / ("abort", request_id), from any thread
        self.waiting: deque[Sequence | RequestState] = deque()
        self.running: list[Sequence] = []
        self.states: dict[str, RequestState] = {}
        self._arrivals = 0
        self._reserved = 0               # batch slots held for forks not yet made

    # ------------------------------------------------------------------------------ requests
    def add_request(self, request: Request, index: int = 0) -> RequestState:
        """Queue a (validated) request; its deltas appear on the returned state as steps run."""
        state = RequestState(request, index)
        self.inbox.append(("add", state))
        return state

    def abort(self, request_id: str) -> None:
        self.inbox.append(("abort", request_id))

    def has_work(self) -> bool:
        return bool(self.inbox or self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len({s.state.request.request_id for s in self.running})

    @property
    def num_waiting(self) -> int:
        return len({(x.state if isinstance(x, Sequence) else x).request.request_id for x in self.waiting})

    def drain_inbox(self) -> None:
        while self.inbox:
            kind, item = self.inbox.popleft()
            if kind == "add":
                self.states[item.request.request_id] = item
                self.waiting.append(item)
            elif item in self.states:
                self._drop(self.states[item], None)

    def _drop(self, state: RequestState, error: BaseException | None) -> None:
        """End a request now (aborted, or failed with `error`): free its blocks, forget its sequences."""
        for s in state.sequences:
            if s.seq is not None:
                self.blocks.free(s.seq)
                s.seq = None
        self.running = [s for s in self.running if s.state is not state]
        self.waiting = deque(x for x in self.waiting if (x.state if isinstance(x, Sequence) else x) is not state)
        self._reserved -= state.forks_pending if state.sequences else 0
        state.forks_pending = 0
        state.error, state.done = error, True
        self.states.pop(state.request.request_id, None)

    def fail_all(self, error: BaseException) -> None:
        """After a step failed halfway: end every request with `error`, so nothing is left half-done."""
        for state in list(self.states.values()):
            self._drop(state, error)

    # ------------------------------------------------------------------------------ a step
    def step(self) -> None:
        self.drain_inbox()
        plan, prefills = StepPlan(0), []
        decode = self._decode_rows()
        if decode:
            plan.decode_batch = self.blocks.prepare([s.seq for s in decode], 1, device="cpu")
            plan.decode_tokens = [s.tokens[-1] for s in decode]
        budget = self.step_tokens - len(decode)
        for s in [s for s in self.running if s.pending > 1]:
            budget -= self._chunk(s, budget, plan, prefills)
        while budget > 0 and self.waiting:
            admitted = self._admit()
            if admitted is None:
                break
            budget -= self._chunk(admitted, budget, plan, prefills)
        if not decode and not prefills:
            self._unstick()
            return
        plan.num_blocks, plan.copies = self.blocks.pools.num_blocks, self.blocks.take_copies()
        # A step of decodes only: every torch op in it is small (see ops.small_ops_threads).
        with ops.small_ops_threads(self.runner.device, small=not prefills):
            self._run(plan, decode, prefills)

    def _run(self, plan: StepPlan, decode: list[Sequence], prefills: list[tuple[Sequence, int]]) -> None:
        decode_logits, prefill_logits = self.runner.execute(plan)
        self.stats.decode_tokens += len(decode)
        self.stats.prefill_tokens += sum(take for _, take in prefills)
        ready, rows = list(decode), []     # the sequences that sample now; their logits beyond decode's
        for s in decode:
            s.num_cached += 1
        for (s, take), logits in zip(prefills, prefill_logits):
            s.num_cached += take
            self.blocks.commit(s.seq, s.tokens)
            if s.pending == 0:
                paths = self._paths_after_prompt(s)
                ready += paths
                rows += [logits] * len(paths)
        for s in decode:
            self.blocks.commit(s.seq, s.tokens)
        self.stats.evicted_blocks = self.blocks.evicted_blocks
        if rows:
            decode_logits = torch.stack(rows) if decode_logits is None else torch.cat([decode_logits, torch.stack(rows)])
        if ready:
            self._sample(ready, decode_logits)

    def _chunk(self, s: Sequence, budget: int, plan: StepPlan, prefills: list) -> int:
        """Schedule the next chunk of s's pending tokens within budget and the blocks to be had -> its size."""
        take = min(s.pending, budget, self.blocks.room(s.seq))
        if take > 0:
            start = s.num_cached
            plan.prefills.append(Prefill(s.tokens[start:start + take], self.blocks.prepare([s.seq], take, device="cpu")))
            prefills.append((s, take))
        return max(take, 0)

    def _decode_rows(self) -> list[Sequence]:
        """The running sequences with one token pending, after preempting the youngest until their blocks fit."""
        while True:
            rows = [s for s in self.running if s.pending == 1]
            need = sum(self.blocks.blocks_needed(s.seq, 1) for s in rows)
            if need <= self.blocks.available():
                return rows
            victim = max(self.running, key=lambda s: s.arrival)
            if len(self.running) == 1:
                self._drop(victim.state, RuntimeError(
                    f"the KV cache cannot hold one sequence of {len(victim.tokens)} tokens: raise kv_cache_tokens"))
                continue
            self._preempt(victim)

    def _preempt(self, s: Sequence) -> None:
        self.blocks.free(s.seq)
        s.seq, s.num_cached = None, 0
        self.running.remove(s)
        self.waiting.appendleft(s)
        self.stats.preemptions += 1

    def _unstick(self) -> None:
        """Nothing could run: prompts wait for blocks that only running prompts hold. Preempt the youngest
        (the oldest then proceeds); with nothing running, the first waiting request cannot fit at all."""
        if len(self.running) > 1:
            self._preempt(max(self.running, key=lambda s: s.arrival))
        elif self.running or self.waiting:
            victim = self.running[0] if self.running else self.waiting[0]
            state = victim.state if isinstance(victim, Sequence) else victim
            self._drop(state, RuntimeError("the KV cache cannot hold this request's prompt: raise kv_cache_tokens"))

    def _admit(self) -> Sequence | None:
        """Give the first waiting sequence (or request) blocks and its cached prefix; None if it must wait."""
        head = self.waiting[0]
        fresh = isinstance(head, RequestState)
        n = head.request.n if fresh else 1
        if len(self.running) + self._reserved + n > self.max_batch_size:
            return None
        s = self._first_path(head) if fresh else head
        s.seq = self.blocks.add_sequence()
        s.num_cached = self.blocks.match_prefix(s.seq, s.tokens)
        if self.blocks.room(s.seq) <= 0:
            self.blocks.free(s.seq)
            s.seq, s.num_cached = None, 0
            if fresh:
                head.sequences.clear()
            return None
        self.waiting.popleft()
        if fresh:
            head.cached_tokens = s.num_cached
            self.stats.cached_tokens += s.num_cached
            self._reserved += head.forks_pending
        s.arrival, self._arrivals = self._arrivals, self._arrivals + 1
        self.running.append(s)
        return s

    def _first_path(self, state: RequestState) -> Sequence:
        s = self._new_path(state, 0, list(state.request.prompt_ids))
        if state.request.grammar is not None:
            s.matcher = state.request.grammar.matcher()
        state.sequences.append(s)
        return s

    def _new_path(self, state: RequestState, j: int, tokens: list[int]) -> Sequence:
        r = state.request
        seed = None if r.seed is None else r.seed + j
        s = Sequence(state, j, tokens, 0, make_generator(self.runner.device, seed), TextStream(self.tokenizer, r.stop),
                     min(r.max_new_tokens, self.max_seq_len - len(r.prompt_ids)))
        if r.params.repetition_penalty != 1.0:
            s.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.runner.device)
            s.seen[torch.tensor(r.prompt_ids, device=self.runner.device)] = True
        s.logprobs = [] if r.logprobs is not None else None
        return s

    def _paths_after_prompt(self, first: Sequence) -> list[Sequence]:
        """The paths that sample from the logits at the end of `first`'s tokens: itself, plus its forks
        when that was its prompt (n > 1)."""
        state = first.state
        paths = [first]
        if state.forks_pending and not first.generated:
            for j in range(1, state.request.n):
                child = self._new_path(state, j, list(first.tokens))
                child.seq, child.num_cached = self.blocks.fork(first.seq), first.num_cached
                child.arrival, self._arrivals = self._arrivals, self._arrivals + 1
                if first.matcher is not None:
                    child.matcher = first.matcher.fork()
                state.sequences.append(child)
                self.running.append(child)
                paths.append(child)
            self._reserved -= state.forks_pending
            state.forks_pending = 0
        return paths

    # ------------------------------------------------------------------------------ sampling
    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample the next token of each of rows from logits [len(rows), V] (float32)."""
        failed = set()
        for i, s in enumerate(rows):
            processors = s.state.request.logits_processors
            if not processors:
                continue
            try:
                row = logits[i]
                for processor in processors:
                    row = processor(list(s.generated), row)
                if not bool(torch.isfinite(row).any()):
                    raise ValueError("logits_processors left no finite logit to sample from (all NaN or -inf)")
                logits[i] = row
            except Exception as e:            # this request fails; the batch goes on
                failed.add(s.state)
                s.state.error = e
        if any(s.matcher is not None for s in rows):
            from .grammar import apply_masks
            apply_masks(logits, [s.matcher for s in rows])
        tokens = [0] * len(rows)
        groups: dict = {}
        for i, s in enumerate(rows):
            if s.state not in failed:
                groups.setdefault(s.state.request.params, []).append(i)
        for params, idx in groups.items():
            seen = torch.stack([rows[i].seen for i in idx]) if rows[idx[0]].seen is not None else None
            picked = sample(logits[idx], params, [rows[i].generator for i in idx], seen).tolist()
            for i, t in zip(idx, picked):
                tokens[i] = t
        for state in failed:
            self._drop(state, state.error)
        for i, s in enumerate(rows):
            if s.state not in failed and not s.state.done:
                self._push(s, tokens[i], logits, i)

    def _push(self, s: Sequence, token: int, logits: torch.Tensor, row: int) -> None:
        """Append `token`, sampled from logits[row], to s."""
        state = s.state
        s.tokens.append(token)
        s.generated.append(token)
        s.budget -= 1
        logprobs = None
        if s.logprobs is not None:
            logprobs = [self._logprob(logits[row], token, state.request.logprobs)]
            s.logprobs += logprobs
        if s.seen is not None:
            s.seen[token] = True
        if s.matcher is not None:
            s.matcher.accept(token)
        if token in state.request.stop_token_ids:
            s.finish_reason = "stop"
        elif s.text.add(token):
            s.finish_reason = "stop"
        elif s.matcher is not None and s.matcher.is_finished():
            s.finish_reason = "stop"
        if s.finish_reason is None and s.budget == 0:
            s.finish_reason = "length"
        if s.finish_reason is not None:
            s.text.finish()
        delta = Delta(state.index, s.sample, s.text.take(s.finish_reason is not None), [token], s.finish_reason,
                      logprobs)
        if s.finish_reason is not None:
            self._finish(s, delta)
        state.outputs.append(delta)

    def _finish(self, s: Sequence, delta: Delta) -> None:
        state = s.state
        self.blocks.free(s.seq)          # its full blocks, prompt and generated, stay in the prefix cache
        s.seq = None
        self.running.remove(s)
        completion = Completion(s.text.text, s.generated, s.finish_reason, len(state.request.prompt_ids),
                                state.cached_tokens, s.logprobs)
        state.completions[s.sample] = delta.completion = completion
        if all(c is not None for c in state.completions):
            state.done = True
            self.states.pop(state.request.request_id, None)

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """{"token_id", "token", "logprob", "top_logprobs": [the `top` likeliest, same keys]} of the distribution
        sampled from (after logits processors and grammar masks, before temperature)."""
        logp = torch.log_softmax(logits.float(), -1)
        values, ids = logp.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))

        def entry(i: int, value: float) -> dict:
            text = self.tokenizer.decode([i]) if self.tokenizer is not None else None
            return {"token_id": i, "token": text, "logprob": value}
        return {**entry(token, float(logp[token])),
                "top_logprobs": [entry(int(i), float(v)) for v, i in zip(values, ids)]}
