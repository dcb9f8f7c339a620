"""Engine output -> OpenAI's response and chunk bodies, for chat (engine.chat's stream dicts) and completions
(engine.generate's Delta objects). One accumulator per endpoint serves both the streaming chunks and
the final body, so the streamed pieces always add up to the non-streamed answer."""

from __future__ import annotations

import time
import uuid


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


class TokenText:
    """A logprobs entry's token as text: the engine's "token" when it gives one, else the tokenizer's
    decoding of "token_id" (a piece of a multi-byte character decodes to U+FFFD, as OpenAI shows it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, entry: dict) -> str:
        if "token" in entry:
            return entry["token"]
        return self.tokenizer.decode([entry["token_id"]]) if self.tokenizer is not None else f"<{entry['token_id']}>"


def chat_logprobs(entries: list[dict], text: TokenText) -> list[dict]:
    """The engine's per-token logprobs -> OpenAI chat's logprobs.content items."""
    out = []
    for e in entries:
        token = text(e)
        tops = [(text(t), t["logprob"]) for t in e.get("top_logprobs", [])]
        out.append({"token": token, "logprob": e["logprob"], "bytes": _bytes(token),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": _bytes(t)} for t, lp in tops]})
    return out


def completion_logprobs(entries: list[dict], offset: int, text: TokenText | None = None) -> dict:
    """The engine's per-token logprobs -> the completions API's {tokens, token_logprobs, top_logprobs, text_offset};
    offset: characters of this choice's text before these tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        token = text(e)
        out["tokens"].append(token)
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({text(t): t["logprob"] for t in e.get("top_logprobs", [])})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


class _Choice:
    def __init__(self):
        self.started = False
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict] = []
        self.logprobs: list[dict] | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None


class ChatAccumulator:
    """Feeds engine.chat stream dicts of n choices; gives OpenAI chunks while streaming and the body at the end."""

    def __init__(self, model: str, n: int, include_usage: bool, token_text: TokenText,
                 max_tool_calls: int | None = None):
        """max_tool_calls: keep only this many calls of a turn (parallel_tool_calls=false, where the
        engine cannot constrain the count itself)."""
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.token_text = token_text
        self.choices = [_Choice() for _ in range(n)]
        self.include_usage, self.max_tool_calls = include_usage, max_tool_calls

    def _chunk(self, index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
        choice = self.choices[index]
        if not choice.started:   # OpenAI's first delta of a choice carries the role
            choice.started = True
            delta = {"role": "assistant", **delta}
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def feed(self, index: int, item: dict) -> list[dict]:
        """One engine.chat delta of choice `index` -> the chunks that stream it."""
        choice, out = self.choices[index], []
        if "reasoning_content" in item:
            choice.reasoning.append(item["reasoning_content"])
            out.append(self._chunk(index, {"reasoning_content": item["reasoning_content"]}))
        if "content" in item:
            choice.content.append(item["content"])
            out.append(self._chunk(index, {"content": item["content"]}))
        for call in item.get("tool_calls", []):
            k = len(choice.tool_calls)
            if self.max_tool_calls is not None and k >= self.max_tool_calls:
                continue
            fn = call["function"]
            choice.tool_calls.append({"id": call["id"], "type": "function",
                                      "function": {"name": fn["name"], "arguments": fn["arguments"]}})
            # OpenAI's order: id, type and name first (empty arguments), then the argument text.
            out.append(self._chunk(index, {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                           "function": {"name": fn["name"], "arguments": ""}}]}))
            out.append(self._chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}))
        if "logprobs" in item:
            entries = chat_logprobs(item["logprobs"], self.token_text)
            choice.logprobs = (choice.logprobs or []) + entries
            out.append(self._chunk(index, {}, logprobs={"content": entries}))
        if "finish_reason" in item:
            choice.finish_reason = item["finish_reason"]
            if self.max_tool_calls is not None and len(choice.tool_calls) >= self.max_tool_calls:
                # The turn the client asked for (its calls) is complete; what ran on was dropped.
                choice.finish_reason = "tool_calls"
            choice.usage = item.get("usage")
            out.append(self._chunk(index, {}, finish_reason=choice.finish_reason))
        return out

    def usage(self) -> dict:
        """Prompt tokens once (every choice has the same prompt), completion tokens summed over choices."""
        done = [c.usage for c in self.choices if c.usage]
        if not done:
            return usage(0, 0, 0)
        return usage(done[0]["prompt_tokens"], sum(u["completion_tokens"] for u in done),
                     done[0].get("cached_tokens", 0))

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def body(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            content = "".join(c.content)
            message = {"role": "assistant", "content": content if content or not c.tool_calls else None,
                       "reasoning_content": "".join(c.reasoning) or None}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            choices.append({"index": i, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": {"content": c.logprobs} if c.logprobs is not None else None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class CompletionAccumulator:
    """Feeds engine.generate Deltas of len(prompt_tokens) prompts x n samples (choice = prompt * n + sample)."""

    def __init__(self, model: str, prompt_tokens: list[int], n: int, include_usage: bool, logprobs: bool,
                 token_text: TokenText):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.token_text = token_text
        self.prompt_tokens, self.n, self.include_usage, self.want_logprobs = prompt_tokens, n, include_usage, logprobs
        count = len(prompt_tokens) * n
        self.text = [""] * count
        self.tokens = [0] * count
        self.finish: list[str | None] = [None] * count
        self.cached = [0] * len(prompt_tokens)
        self.logprobs = [completion_logprobs([], 0) for _ in range(count)]

    def feed(self, delta) -> dict:
        """One engine Delta -> its chunk."""
        i = delta.prompt * self.n + delta.sample
        lp = None
        if self.want_logprobs and delta.logprobs:
            lp = completion_logprobs(delta.logprobs, len(self.text[i]), self.token_text)
            for key, values in lp.items():
                self.logprobs[i][key] += values
        self.text[i] += delta.text
        self.tokens[i] += len(delta.token_ids)
        self.finish[i] = delta.finish_reason
        completion = getattr(delta, "completion", None)
        if completion is not None and delta.sample == 0:
            self.cached[delta.prompt] = getattr(completion, "cached_tokens", 0)
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [{"index": i, "text": delta.text, "logprobs": lp, "finish_reason": delta.finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens), sum(self.tokens), sum(self.cached))

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def body(self) -> dict:
        choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": self.logprobs[i] if self.want_logprobs else None}
                   for i, (t, f) in enumerate(zip(self.text, self.finish))]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
