"""Constrained decoding: per-sequence token masks from llguidance grammars.

A request may carry a grammar (a JSON schema, a regex, a Lark grammar, or the chat constraints
tools / tool_choice / response_format); `GrammarCompiler.compile` turns it into a `Grammar`, each
sampling path gets its own `Matcher`, and every decode step `apply_masks` sets the logits of the
tokens a row's matcher forbids to -inf before sampling.

Why llguidance (guidance-ai/llguidance) and not xgrammar. Kimi's tool-call format is made of
special tokens (<|tool_calls_section_begin|>, <|tool_call_begin|>, <|tool_call_argument_begin|>,
<|tool_call_end|>, <|tool_calls_section_end|>; <think> and </think> are special in Kimi K2
Thinking's vocabulary and in the demo's), and a guarantee about tool calls has to force those exact
ids and forbid them elsewhere. llguidance's Lark grammars name special tokens as grammar symbols
(`<|tool_call_begin|>`, or `<[163597]>` by id) beside ordinary text terminals and inline JSON
schemas (`@name` references to JSON-schema grammars), so one grammar says "reasoning, then
</think>, then a section of calls whose arguments follow each tool's schema" at the token level.
xgrammar's grammars match bytes, and in the releases vLLM and SGLang have shipped (0.1.x) its
TokenizerInfo keeps special tokens out of every mask except its stop tokens, so the markers could
only be spelled as text, which the model never writes. llguidance also builds its tokenizer
straight from the `tokenizers` JSON we already make (Kimi's tiktoken ranks as a byte-level BPE,
kimi_engine/tokenizer.py), takes the model's vocab_size
(padding rows past the tokenizer are never allowed), fills a batch of masks in parallel in Rust
with the GIL released (LLExecutor), and reports unsupported JSON-schema keywords as errors instead
of silently ignoring them. It is what vLLM's "guidance" backend and SGLang's llguidance backend use.

Grammar syntax: `grammar=` is llguidance's Lark dialect (Lark plus `<|special|>` / `<[id]>` tokens,
`%json {...}` inline schemas and `[max_tokens=N]`-style lexeme options; regexes are Rust `regex`
syntax), `regex=` is a Rust `regex`, `json_schema=` a JSON Schema (dict or JSON text). llguidance
writes object properties in the schema's order, and JSON whitespace is limited to JSON_WHITESPACE
between tokens (at most one space), so a weak model cannot spin in blanks.

Chat semantics (the prompt ends with "<|im_assistant|>assistant<|im_middle|>"; see chat.py):
    thinking=True:  <think>? REASONING </think>  then the body   (no other special token inside)
    thinking=False: the body (the prompt already holds "<think></think>")
    tool_choice "required" / {"type": "function", "function": {"name": N}}:
        body = <|tool_calls_section_begin|> CALL+ <|tool_calls_section_end|>, where
        CALL = <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>,
        NAME a declared tool (the named one), ARGS JSON valid under its `parameters`;
        IDX = first_call_index + k for the k-th call of the turn when first_call_index is given
        (Kimi counts calls over the whole conversation; the caller knows how many came before),
        else any non-negative integer. parallel_tool_calls=False: exactly one call.
    "auto" with tools whose function.strict is true:
        body = CONTENT? SECTION? — free text, and if the model opens a section, each call names a
        declared tool; a strict tool's ARGS follow its schema, a non-strict tool's are free text.
        With response_format: body = RESPONSE | SECTION.
    "none": body = CONTENT? (no tool-call token can be sampled), or RESPONSE with response_format.
    response_format json_object / json_schema: body = RESPONSE (that JSON) — constrained whether or
        not its "strict" is set; {"type": "text"} constrains nothing.
    The end of every grammar is an end token (<|im_end|>, [EOS]: `eos_token_ids`), allowed once the
    grammar is complete; after a complete tool-call section it is the only token allowed.
Returned None when nothing constrains ("auto" without strict tools and without response_format).

Mask overhead per decode step (apply_masks: llguidance fills the bitmasks, then the penalties are
added), benchmarks/bench_grammar.py, every row in a forced tool call, float32 logits, on this
project's 2-core CPU (shared with other jobs; medians of 300 steps):
    vocab 4,096 (demo):                 batch 1: 0.05 ms   batch 8: 0.2 ms
    vocab 163,840 (Kimi's size, synthetic tokenizer):  batch 1: 0.23 ms   batch 8: 1.35 ms
The demo decodes a token in about 19 ms there (54 tokens/s), so constraints cost it about 1%. Most of the Kimi-size
time is torch's gather over 163,840 x 8 logits (one uncached llguidance fill of a row: 10-70 us);
on a loaded machine (load average 11) the same run measured 0.22 / 6.0 ms with one torch thread.
Accepting a token costs 5-20 us per row.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Callable, Iterable, NamedTuple

import llguidance as llg
import numpy as np
import torch

from ..chat.parser import ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, THINK_BEGIN, THINK_END

# JSON whitespace between tokens: nothing or one space, so compact JSON and json.dumps' default
# separators (", ", ": ") both pass, on one line. llguidance's default allows any run of blanks and
# line breaks, in which a model can spend its whole budget (the demo model fills it with Shakespeare's
# indentation; vLLM grew a switch against this with xgrammar); tool arguments and JSON answers are
# data, their layout carries nothing. GrammarCompiler(json_whitespace=...) takes another regex.
JSON_WHITESPACE = r"\x20?"

# With first_call_index, call k of the turn must carry index first_call_index + k; the grammar
# spells each index out, so it names this many calls at most (after as many the section must close).
MAX_INDEXED_CALLS = 32

TEXT = "/(?s:.)+/"                  # any text (never a special token: their bytes are not UTF-8)
CACHE_SIZE = 256                    # compiled grammars kept per compiler (least recently used dropped)


class Grammar:
    """A compiled grammar: `matcher()` gives each sampling path a fresh Matcher.

    kind: "json_schema" | "regex" | "grammar" | "chat"; text: the llguidance grammar (JSON) it runs.
    """

    def __init__(self, compiler: "GrammarCompiler", kind: str, text: str, template: llg.LLMatcher):
        self.compiler, self.kind, self.text = compiler, kind, text
        self._template = template   # validated at compile time; matchers are deep copies (about 1 us)

    def matcher(self) -> "Matcher":
        return Matcher(self, self._template.deep_copy())

    def logits_processor(self) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
        """An adapter for engine.generate(..., logits_processors=[...]): one Matcher per sampling path.

        generate calls a processor with each path's generated ids (a list that lives as long as the
        path) and its logits row. The adapter keys a matcher on that list, accepts the ids it has not
        seen yet, and returns a masked copy of the row (rows of a request's first step share memory,
        so the row itself is never written).
        """
        return _PathProcessor(self)

    def __repr__(self) -> str:
        return f"Grammar(kind={self.kind!r}, {len(self.text)} chars)"


class Matcher:
    """The state of one sequence under a Grammar. Not thread-safe: one sequence, one thread."""

    __slots__ = ("grammar", "_m", "_finished")

    def __init__(self, grammar: Grammar, m: llg.LLMatcher):
        self.grammar, self._m, self._finished = grammar, m, False

    def accept(self, token_id: int) -> None:
        """Advance by one sampled token. ValueError if the grammar does not allow it (state unchanged)."""
        compiler = self.grammar.compiler
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < compiler.vocab_size:
            raise ValueError(f"token_id={token_id!r}: must be an integer in [0, vocab_size={compiler.vocab_size})")
        if self._finished:
            raise ValueError(f"token {token_id} after the grammar finished (an end token was accepted)")
        if token_id in compiler.eos_token_ids:
            # llguidance's validate_tokens refuses end tokens, both at the end of the grammar and where
            # a grammar names one (<|im_end|> in Lark): ask the mask (computed and cached this step).
            mask = self._m.compute_bitmask()
            allowed = bool(mask[token_id // 8] >> (token_id % 8) & 1)
        else:
            allowed = token_id < compiler.tokenizer_vocab_size and self._m.validate_tokens([token_id]) == 1
        if not allowed:
            raise ValueError(f"token {token_id} ({compiler.token_text(token_id)!r}) is not allowed here by the "
                             f"{self.grammar.kind} grammar; it was not masked, or the matcher missed a token")
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"llguidance refused token {token_id} it had validated: {self._m.get_error()}")
        # The engine ends a sequence at any of these ids, wherever the grammar put them.
        self._finished = token_id in compiler.eos_token_ids

    def is_finished(self) -> bool:
        """True once an end token (eos_token_ids) was accepted: the completion matches the grammar."""
        return self._finished

    def is_complete(self) -> bool:
        """True when the text so far is a complete match (an end token is allowed now)."""
        return self._finished or self._m.is_accepting()

    def fork(self) -> "Matcher":
        """An independent copy in the same state (for copy-on-write forks of a sequence)."""
        copy = Matcher(self.grammar, self._m.deep_copy())
        copy._finished = self._finished
        return copy

    def reset(self) -> None:
        """Back to the start (after a preemption the scheduler re-accepts the recomputed tokens)."""
        self._m.reset()
        self._finished = False

    def allowed_token_ids(self) -> list[int]:
        """The ids the grammar allows next (for tests and debugging; decode steps use apply_masks)."""
        logits = torch.zeros(1, self.grammar.compiler.vocab_size)
        apply_masks(logits, [self])
        return torch.isfinite(logits[0]).nonzero().flatten().tolist()

    def __repr__(self) -> str:
        return f"Matcher({self.grammar.kind}, finished={self._finished})"


class GrammarCompiler:
    """Compiles and caches grammars against one tokenizer and model vocabulary. Thread-safe.

    tokenizer: kimi_engine's Tokenizer (a `tokenizers` backend, special tokens). vocab_size: the
    model's (config.vocab_size, >= the tokenizer's; the ids past the tokenizer are padding rows of
    the embedding and are never allowed). eos_token_ids: the ids that end a sequence (default: the
    tokenizer's eos, [EOS] and <|im_end|>; the engine passes its stop ids); a grammar allows them
    once complete, and a Matcher is finished when it accepts one.
    """

    def __init__(self, tokenizer, vocab_size: int, *, eos_token_ids: Iterable[int] | None = None,
                 json_whitespace: str = JSON_WHITESPACE, cache_size: int = CACHE_SIZE):
        if not isinstance(vocab_size, int) or vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size={vocab_size!r}: must be an integer >= the tokenizer's {tokenizer.vocab_size}")
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_token_id, tokenizer.token_to_id("[EOS]"),
                             tokenizer.token_to_id("<|im_end|>")]
        eos = sorted({int(i) for i in eos_token_ids if i is not None})
        if not eos or not all(0 <= i < tokenizer.vocab_size for i in eos):
            raise ValueError(f"eos_token_ids={eos}: need at least one, each a token of the tokenizer")
        self.tokenizer, self.vocab_size, self.tokenizer_vocab_size = tokenizer, vocab_size, tokenizer.vocab_size
        self.eos_token_ids = frozenset(eos)
        self.json_options = {"whitespace_flexible": True, "whitespace_pattern": json_whitespace}
        # llguidance reads the `tokenizers` JSON (byte-level BPE; added tokens marked special become
        # grammar symbols). n_vocab: masks cover the model's rows; the padding ids get no bytes.
        self._ll = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._special = dict(tokenizer.special_tokens)             # string -> id
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._schema_errors: dict[str, str] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._maskers: dict[torch.device, _Masker] = {}
        self._executor = llg.LLExecutor()

    def token_text(self, token_id: int) -> str:
        if token_id >= self.tokenizer_vocab_size:
            return f"<padding id {token_id}>"
        return self.tokenizer.decode([token_id])

    # compile ----------------------------------------------------------------------------------------
    def compile(self, *, json_schema=None, regex: str | None = None, grammar: str | None = None, tools=None,
                tool_choice=None, response_format=None, thinking: bool = True, first_call_index: int | None = None,
                parallel_tool_calls: bool = True) -> Grammar | None:
        """Validate and compile a request's constraints; None when nothing constrains.

        Plain generation: one of json_schema (dict or JSON text) / regex / grammar (llguidance Lark):
        the whole completion matches it, then an end token. Chat: tools (OpenAI tool dicts),
        tool_choice ("auto" | "none" | "required" | {"type": "function", "function": {"name": N}}),
        response_format ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}),
        thinking, first_call_index, parallel_tool_calls: see the module docstring.
        Raises ValueError naming the argument (json_schema, regex, grammar, tools[i], tool_choice,
        response_format, first_call_index, ...) for anything invalid or unsupported, before compiling.
        """
        plain = [(name, value) for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
                 if value is not None]
        if len(plain) > 1:
            raise ValueError(f"{plain[1][0]}: give at most one of json_schema, regex and grammar "
                             f"(got {', '.join(n for n, _ in plain)})")
        if plain:
            name, value = plain[0]
            if tools or tool_choice not in (None, "auto") or response_format is not None:
                raise ValueError(f"{name}: constrains a plain completion; it cannot be combined with tools, "
                                 "tool_choice or response_format (chat constraints)")
            return self._plain(name, value)
        return self._chat(tools, tool_choice, response_format, thinking, first_call_index, parallel_tool_calls)

    def _plain(self, name: str, value) -> Grammar:
        if name == "json_schema":
            schema = _schema_object(value, "json_schema")
            return self._build("json_schema", {"grammars": [{"json_schema": self._with_options(schema)}]}, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: must be a non-empty string, got {type(value).__name__}")
        text = llg.LLMatcher.grammar_from_regex(value) if name == "regex" else llg.LLMatcher.grammar_from_lark(value)
        return self._build(name, text, name)

    def _chat(self, tools, tool_choice, response_format, thinking, first_call_index, parallel_tool_calls):
        declared = _check_tools(tools)
        choice = _check_tool_choice(tool_choice, declared)
        response = _check_response_format(response_format)
        if not isinstance(thinking, bool):
            raise ValueError(f"thinking={thinking!r}: must be True or False")
        if first_call_index is not None and (not isinstance(first_call_index, int) or isinstance(first_call_index, bool)
                                             or first_call_index < 0):
            raise ValueError(f"first_call_index={first_call_index!r}: must be an integer >= 0 or None")
        if not isinstance(parallel_tool_calls, bool):
            raise ValueError(f"parallel_tool_calls={parallel_tool_calls!r}: must be True or False")

        if choice == "auto":
            callable_ = [t for t in declared if t.strict]
            if not callable_ and response is None:
                return None             # free text and free calls: nothing to constrain
            callable_ = declared        # a call may name any declared tool; strict ones get their schema
        elif choice == "none":
            callable_ = []
        elif choice == "required":
            callable_ = list(declared)
        else:                           # a named function
            callable_ = [t for t in declared if t.name == choice[1]]
        forced = choice not in ("auto", "none")
        if forced:                      # a forced call follows its schema whether or not it says strict
            callable_ = [t._replace(strict=True) for t in callable_]

        subgrammars, lark = [], ["%llguidance {}"]
        if response is not None and not forced:
            subgrammars.append({"name": "response", "json_schema": self._checked_schema(response, "response_format")})
        for t in callable_:
            if t.strict:
                subgrammars.append({"name": f"args_{t.index}",
                                    "json_schema": self._checked_schema(t.parameters, f"tools[{t.index}]")})

        if forced:
            body = "section"
        elif response is not None:
            body = "(response | section)" if callable_ else "response"
        else:
            body = "CONTENT? section?" if callable_ else "CONTENT?"
        prefix, think_rules = self._think_prefix() if thinking else ("", [])
        lark += [f"start: {prefix} {body}".replace("  ", " "), f"CONTENT: {TEXT}", *think_rules]
        if response is not None and not forced:
            lark.append("response: @response")
        if callable_:
            lark += self._section_rules(callable_, first_call_index, parallel_tool_calls)
        top = {"grammars": [{"lark_grammar": "\n".join(lark) + "\n"}, *subgrammars]}
        return self._build("chat", top, "tool_choice" if callable_ else "response_format")

    def _think_prefix(self) -> tuple[str, list[str]]:
        """Reasoning: an optional <think>, any text, then </think> (special tokens, else text); its rules."""
        begin, end = self._special.get(THINK_BEGIN), self._special.get(THINK_END)
        opener = f"<[{begin}]>?" if begin is not None else f"{_lark_string(THINK_BEGIN)}?"
        if end is not None:
            return f"{opener} REASONING? <[{end}]>", [f"REASONING: {TEXT}"]
        # </think> as text: a lazy lexeme that ends at its first occurrence.
        return f"{opener} reasoning", [f"reasoning[suffix={_lark_string(THINK_END)}]: /(?s:.)*/"]

    def _section_rules(self, tools, first_call_index, parallel) -> list[str]:
        marks = {}
        for mark in (SECTION_BEGIN[0], SECTION_END[0], CALL_BEGIN, ARG_BEGIN, CALL_END):
            if mark not in self._special:
                raise ValueError(f"tool_choice: this tokenizer has no special token {mark!r}, which Kimi's "
                                 "tool-call format needs")
            marks[mark] = f"<[{self._special[mark]}]>"
        rules = ["INDEX: /0|[1-9][0-9]*/"]
        if not all(t.strict for t in tools):
            rules.append(f"ARGS: {TEXT}")   # a non-strict tool's arguments in "auto": free text
        for t in tools:
            rules.append(f"args_{t.index}: " + (f"@args_{t.index}" if t.strict else "ARGS?"))
        if first_call_index is None:
            rules.append(f"call: {marks[CALL_BEGIN]} ("
                         + " | ".join(f'{_lark_string(f"functions.{t.name}:")} INDEX {marks[ARG_BEGIN]} args_{t.index}'
                                      for t in tools) + f") {marks[CALL_END]}")
            calls = "call+" if parallel else "call"
        else:
            n = 1 if not parallel else MAX_INDEXED_CALLS
            for k in range(n):
                rules.append(f"call_{k}: {marks[CALL_BEGIN]} ("
                             + " | ".join(f'{_lark_string(f"functions.{t.name}:{first_call_index + k}")} '
                                          f'{marks[ARG_BEGIN]} args_{t.index}' for t in tools) + f") {marks[CALL_END]}")
                rules.append(f"calls_{k}: call_{k}" + (f" calls_{k + 1}?" if k + 1 < n else ""))
            calls = "calls_0"
        rules.append(f"section: {marks[SECTION_BEGIN[0]]} {calls} {marks[SECTION_END[0]]}")
        return rules

    def _with_options(self, schema: dict) -> dict:
        # Our JSON options as defaults; a schema's own "x-guidance" (llguidance's key) wins.
        schema = closed_objects(schema)
        return {**schema, "x-guidance": {**self.json_options, **schema.get("x-guidance", {})}}

    def _checked_schema(self, schema: dict, argument: str) -> dict:
        """The schema with our options, checked alone so an error names the argument it came from."""
        schema = self._with_options(schema)
        text = json.dumps({"grammars": [{"json_schema": schema}]})
        with self._lock:
            error = self._schema_errors.get(text)
        if error is None:
            error = llg.LLMatcher.validate_grammar(text, self._ll)
            with self._lock:
                self._schema_errors[text] = error
                if len(self._schema_errors) > 4 * self._cache_size:
                    self._schema_errors.pop(next(iter(self._schema_errors)))
        if error:
            raise ValueError(f"{argument}: invalid or unsupported JSON schema: {error}")
        return schema

    def _build(self, kind: str, grammar, argument: str) -> Grammar:
        text = grammar if isinstance(grammar, str) else json.dumps(grammar, ensure_ascii=False)
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return cached
        # Compiled outside the lock (llguidance drops the GIL): two threads compiling the same text
        # both succeed and one result is kept.
        error = llg.LLMatcher.validate_grammar(text, self._ll)
        if error:
            what = {"json_schema": "invalid or unsupported JSON schema", "regex": "invalid regex",
                    "grammar": "invalid grammar"}.get(argument, "cannot be compiled")
            raise ValueError(f"{argument}: {what}: {error}")
        template = llg.LLMatcher(self._ll, text, log_level=0)
        if template.is_error():
            raise ValueError(f"{argument}: cannot be compiled: {template.get_error()}")
        compiled = Grammar(self, kind, text, template)
        with self._lock:
            compiled = self._cache.setdefault(text, compiled)
            self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    # masks ------------------------------------------------------------------------------------------
    def masker(self, device: torch.device) -> "_Masker":
        device = torch.device(device)
        with self._lock:
            if device not in self._maskers:
                self._maskers[device] = _Masker(self, device)
            return self._maskers[device]


def apply_masks(logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
    """Set to -inf, in place, the logits each row's matcher forbids; rows whose matcher is None stay as they are.

    logits [B, V] floating (V = the compiler's vocab_size, rows must not share memory);
    matchers: B entries, all from one GrammarCompiler. One bitmask fill (llguidance, in parallel
    over the rows, into a reused pinned buffer), one host-to-device copy and one masked_fill per step.
    """
    compiler = next((m.grammar.compiler for m in matchers if m is not None), None)
    if compiler is None:
        return
    compiler.masker(logits.device).apply(logits, matchers)


class _Masker:
    """Reused bitmask buffers of one compiler on one device (they grow with the batch).

    Each step: llguidance writes the constrained rows' bitmasks into a pinned host buffer (in
    parallel over rows), one upload, then each mask byte looks up its 8 penalties (0 or -inf) and the
    penalties are added to the constrained rows. Adding a gathered penalty is 5x faster on a CPU than
    masked_fill with the unpacked mask (163,840 ids x 8 rows: 0.7 ms against 3.4 ms); free rows are
    not read or written.
    """

    def __init__(self, compiler: GrammarCompiler, device: torch.device):
        self.compiler, self.device = compiler, device
        self.words = (compiler.vocab_size + 31) // 32                     # int32 words per row
        self._lock = threading.Lock()
        self._capacity = 0
        # valid: bits of the tokenizer's ids; ANDed into every constrained row so a user grammar that
        # names a padding id (<[id]> past the tokenizer) still cannot allow it.
        valid = torch.zeros(self.words * 32, dtype=torch.bool)
        valid[:compiler.tokenizer_vocab_size] = True
        self._valid = _pack_bits(valid)
        # penalty[b, j] = 0 if bit j of byte value b is set (allowed) else -inf, lowest bit first:
        # llguidance's order, its int32 words read as bytes on a little-endian host.
        allowed = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()
        self._penalty32 = torch.zeros(256, 8).masked_fill(~allowed, float("-inf")).to(device)
        self._penalty: dict[torch.dtype, torch.Tensor] = {}
        self._copied = None                                               # CUDA event of the last upload

    def _grow(self, rows: int) -> None:
        pin = self.device.type == "cuda"
        self._capacity = max(rows, 2 * self._capacity)
        self._host = torch.empty(self._capacity, self.words, dtype=torch.int32, pin_memory=pin)
        self._dev = self._host if self.device.type == "cpu" else torch.empty_like(self._host, device=self.device)

    def apply(self, logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
        if logits.dim() != 2 or logits.shape != (len(matchers), self.compiler.vocab_size):
            raise ValueError(f"logits of shape {tuple(logits.shape)}: expected [len(matchers)={len(matchers)}, "
                             f"vocab_size={self.compiler.vocab_size}]")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if logits.shape[0] > 1 and logits.stride(0) == 0:
            raise ValueError("logits rows share memory (an expanded view): masking one row would mask them all")
        if any(m.grammar.compiler is not self.compiler for m in matchers if m is not None):
            raise ValueError("matchers come from different GrammarCompilers")
        where = [i for i, m in enumerate(matchers) if m is not None]
        if not where:
            return
        count = len(where)
        with self._lock:
            if count > self._capacity:
                self._grow(count)
            if self._copied is not None:
                self._copied.synchronize()          # the last upload has left the pinned buffer
            host = self._host[:count]               # row k: the mask of logits row where[k]
            self._fill([matchers[i]._m for i in where], host)
            host &= self._valid
            dev = self._dev[:count]
            if self.device.type == "cuda":        # async from pinned memory; the event guards the reuse
                dev.copy_(host, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record()
            elif self.device.type != "cpu":
                dev.copy_(host)
            penalty = self._penalty.get(logits.dtype)
            if penalty is None:
                penalty = self._penalty[logits.dtype] = self._penalty32.to(logits.dtype)
            # [R, W] int32 -> [R*4W] bytes -> [R*4W, 8] penalties -> [R, V]
            rows = penalty.index_select(0, dev.view(torch.uint8).flatten().int()).view(count, -1)
            rows = rows[:, :self.compiler.vocab_size]
            if count == logits.shape[0]:
                logits.add_(rows)
            else:
                index = torch.tensor(where).to(self.device, non_blocking=True)
                logits.index_add_(0, index, rows)

    def _fill(self, matchers: list[llg.LLMatcher], host: torch.Tensor) -> None:
        """llguidance writes matcher k's bitmask into host[k] (int32 [len(matchers), words], contiguous)."""
        if len(matchers) == 1:                      # no thread hand-off for a single row
            matchers[0].unsafe_compute_mask_ptr(host.data_ptr(), self.words * 4)
        else:
            self.compiler._executor.unsafe_compute_mask_ptr([(m, k) for k, m in enumerate(matchers)],
                                                           host.data_ptr(), self.words * 4, host.shape[0])


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool [32W] -> int32 [W], flag j at bit j % 32 of word j // 32 (llguidance's layout, little-endian)."""
    return torch.from_numpy(np.packbits(flags.numpy(), bitorder="little").view(np.int32).copy())


class _PathProcessor:
    """Grammar.logits_processor(): a matcher per generated-ids list (= per sampling path)."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        # id(list) -> (the list, its matcher, ids accepted). Holding the list keeps its id unique.
        self._paths: dict[int, tuple[list[int], Matcher, int]] = {}

    def __call__(self, token_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        entry = self._paths.get(id(token_ids))
        if entry is None:
            entry = (token_ids, self.grammar.matcher(), 0)
        ids, matcher, seen = entry
        for token in token_ids[seen:]:
            matcher.accept(int(token))
        self._paths[id(token_ids)] = (ids, matcher, len(token_ids))
        if matcher.is_finished():
            return row
        out = row.clone()[None]
        apply_masks(out, [matcher])
        return out[0]


# request checks ---------------------------------------------------------------------------------------

class _Tool(NamedTuple):
    """A declared tool: its position in `tools`, name, parameters schema, and function.strict."""
    index: int
    name: str
    parameters: dict
    strict: bool


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalItems", "not", "if", "then", "else", "contains")


def closed_objects(schema):
    """The schema with every object that lists its properties but leaves additionalProperties unsaid
    closed to those properties, as OpenAI's strict mode and xgrammar's strict_mode (vLLM's default) read schemas.
    Left open, a grammar lets the model invent keys after the declared ones, and a model that does
    not know when to stop (the demo) spends its whole budget inside one; say
    "additionalProperties": true to allow extra keys. allOf branches are left as written: closing
    each part of an intersection would forbid the other parts' keys."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    # Only objects that list their properties: a bare {"type": "object"} means any object.
    if "properties" in out and "additionalProperties" not in out and "allOf" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _schema_object(value, argument: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{argument}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{argument}: a JSON schema must be an object, got {type(value).__name__}")
    return value


def _check_tools(tools) -> list[_Tool]:
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools: expected a list of OpenAI tool dicts, got {type(tools).__name__}")
    declared, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise ValueError(f'{where}: expected {{"type": "function", "function": '
                             '{"name": ..., "parameters": ...}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in ':"\\') or not name.isprintable():
            raise ValueError(f"{where}: function.name must be a non-empty printable string without ':', '\"' or '\\', "
                             f"got {name!r}")
        if name in names:
            raise ValueError(f"{where}: a second tool named {name!r}")
        names.add(name)
        # Omitted parameters declare a function without arguments (OpenAI's rule).
        parameters = function.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        parameters = _schema_object(parameters, f"{where}: function.parameters")
        if parameters.get("type", "object") != "object":
            raise ValueError(f"{where}: function.parameters must be a schema of type 'object' (arguments are a JSON "
                             f"object), got type {parameters.get('type')!r}")
        strict = function.get("strict", False)
        if not isinstance(strict, bool) and strict is not None:
            raise ValueError(f"{where}: function.strict must be true or false, got {strict!r}")
        declared.append(_Tool(i, name, {**parameters, "type": "object"}, bool(strict)))
    return declared


def _check_tool_choice(tool_choice, declared: list[_Tool]):
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if not declared:
        raise ValueError(f"tool_choice={tool_choice!r}: needs tools")
    if tool_choice in ("none", "required"):
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
        name = tool_choice["function"]["name"]
        if name not in {t.name for t in declared}:
            raise ValueError(f"tool_choice: unknown tool {name!r}; declared: {', '.join(t.name for t in declared)}")
        return ("named", name)
    raise ValueError(f'tool_choice={tool_choice!r}: expected "auto", "none", "required" or '
                     '{"type": "function", "function": {"name": ...}}')


def _check_response_format(response_format) -> dict | None:
    """The schema the answer must follow, or None."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError('response_format: "json_schema" needs {"name": ..., "schema": {...}}')
        if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
            raise ValueError(f"response_format: json_schema.strict must be true or false, got {spec['strict']!r}")
        return _schema_object(spec.get("schema", {"type": "object"}), "response_format: json_schema.schema")
    raise ValueError(f'response_format={response_format!r}: expected '
                     '{"type": "text" | "json_object" | "json_schema"}')


def _lark_string(text: str) -> str:
    """A Lark string literal: JSON's escapes are Lark's for the characters tool names may hold."""
    return json.dumps(text, ensure_ascii=False)
