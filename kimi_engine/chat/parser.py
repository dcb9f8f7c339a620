"""Parse what the model writes back into an OpenAI-format assistant message, one-shot or streaming.

Kimi K2 Thinking writes an assistant turn as (after the template's "<|im_assistant|>assistant<|im_middle|>")

    <think>reasoning</think>content<|tool_calls_section_begin|>
    <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{"json": "args"}<|tool_call_end|>
    ... more calls ...<|tool_calls_section_end|><|im_end|>

(without the line breaks). parse_assistant / StreamParser turn that into an OpenAI-format message.
Messages and tools are in the OpenAI chat format throughout.
"""

from __future__ import annotations

import copy
import json
import re

# ---------------------------------------------------------------------------------------------
# Parsing the assistant's text. One state machine serves both the one-shot and the streaming
# parser, so they cannot disagree. Rules, each one a bug the peers fixed late:
#   - reasoning may begin without <think> (K2 Thinking starts thinking right after the prompt);
#   - reasoning ends at </think> or at the tool-call section (the model sometimes skips </think>);
#   - a section holds several calls; a call whose <|tool_call_end|> is missing still ends at the
#     next call or the section end, and a <|tool_call_begin|> without a section opens one;
#   - arguments that are not a JSON object are kept raw and flagged ("error"), never raised;
#   - a text cut off inside a section keeps the complete calls and drops the unfinished one;
#   - no control token reaches content or reasoning (arguments keep theirs: they are data).

THINK_BEGIN, THINK_END = "<think>", "</think>"
SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")  # the singular form occurs too
SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MESSAGE_END = ("<|im_end|>", "[EOS]", "[EOT]")           # nothing after these belongs to the message
OTHER_CONTROL = ("<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>", "<|start_header_id|>",
                 "<|end_header_id|>", "[BOS]", "[UNK]", "[PAD]")  # dropped wherever they appear
_RESERVED = "<|reserved_token_"                          # + id + "|>": Kimi's unnamed special tokens

_FIXED = sorted({THINK_BEGIN, THINK_END, CALL_BEGIN, ARG_BEGIN, CALL_END, *SECTION_BEGIN, *SECTION_END,
                 *MESSAGE_END, *OTHER_CONTROL}, key=len, reverse=True)
_CONTROL_RE = re.compile("|".join(map(re.escape, _FIXED)) + "|" + re.escape(_RESERVED) + r"\d+\|>")
_PREFIXES = {t[:i] for t in _FIXED for i in range(1, len(t))} | {_RESERVED[:i] for i in range(1, len(_RESERVED))}
_RESERVED_PARTIAL_RE = re.compile(re.escape(_RESERVED) + r"\d*\|?")
_LONGEST = len(_FIXED[0])

_REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS, _DONE = range(6)


def _partial_control_len(text: str) -> int:
    """Length of the longest tail of `text` that more text could complete into a control token."""
    # A reserved token's id has no length limit, so its start is looked for explicitly; a partial
    # one holds no other "<|", so only the last "<|" can start it.
    start = text.rfind("<|")
    if start >= 0 and _RESERVED_PARTIAL_RE.fullmatch(text, start):
        return len(text) - start
    for start in range(max(0, len(text) - _LONGEST), len(text)):
        if text[start:] in _PREFIXES:
            return len(text) - start
    return 0


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def make_tool_call(call_id: str, arguments: str) -> dict:
    """An OpenAI tool call from Kimi's call id (functions.NAME:IDX) and argument text.

    The name is what stands between "functions." and the last ":". Arguments stay the model's text
    (stripped); when they are not a JSON object, or no name can be read, the call carries "error".
    """
    call_id, arguments = call_id.strip(), arguments.strip()
    name = call_id.removeprefix("functions.")
    name = name.rpartition(":")[0] if ":" in name else name
    problems = [] if name else ["the call id names no function"]
    try:
        if not isinstance(json.loads(arguments, parse_constant=_reject_constant), dict):
            problems.append("arguments are not a JSON object")
    except (ValueError, RecursionError) as e:
        problems.append(f"arguments are not valid JSON ({type(e).__name__}: {e})")
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    if problems:
        call["error"] = "; ".join(problems)
    return call


class StreamParser:
    """Parses an assistant turn as it streams: feed() text deltas, then close().

    Each call returns a list of OpenAI-style deltas: {"reasoning_content": str}, {"content": str},
    or {"tool_calls": [{"index": i, **call}]} once a call is complete (calls are never streamed in
    pieces: a call cut off later would have to be taken back). thinking=False starts in content,
    for a prompt that already closed the reasoning. Text that may be the start of a control token
    is held back until the next delta decides it, so for any split of a text the deltas add up to
    parse_assistant(text); `message` is that result so far.
    """

    def __init__(self, thinking: bool = True):
        self._state = _REASONING if thinking else _CONTENT
        self._pending = ""                       # held-back tail that may start a control token
        self._parts: dict[str, list[str]] = {"content": [], "reasoning_content": []}
        self._calls: list[dict] = []
        self._call: list[list[str]] | None = None   # [id parts, argument parts] of the open call
        self._implicit_section = False           # the open section began at a bare <|tool_call_begin|>

    @property
    def message(self) -> dict:
        return {"role": "assistant", **{k: "".join(v) for k, v in self._parts.items()},
                "tool_calls": copy.deepcopy(self._calls)}

    def feed(self, delta: str) -> list[dict]:
        text, out = self._pending + delta, []
        while (match := _CONTROL_RE.search(text)) is not None:
            self._text(text[:match.start()], out)
            self._control(match.group(), out)
            text = text[match.end():]
        keep = len(text) - _partial_control_len(text)
        self._text(text[:keep], out)
        self._pending = text[keep:]
        return out

    def close(self) -> list[dict]:
        """End of text: the held-back tail was text after all; an unfinished call is dropped."""
        out = []
        self._text(self._pending, out)
        self._pending, self._call, self._state = "", None, _DONE
        return out

    def _text(self, text: str, out: list[dict]) -> None:
        if not text or self._state in (_SECTION, _DONE):    # text between calls or after the end is dropped
            return
        if self._state in (_CALL_ID, _CALL_ARGS):
            self._call[self._state == _CALL_ARGS].append(text)
            return
        key = "reasoning_content" if self._state == _REASONING else "content"
        self._parts[key].append(text)
        if out and key in out[-1]:   # one delta per kind and feed
            out[-1][key] += text
        else:
            out.append({key: text})

    def _control(self, token: str, out: list[dict]) -> None:
        state = self._state
        if state == _DONE:
            return
        if token in MESSAGE_END:
            self._call, self._state = None, _DONE
        elif state in (_CALL_ID, _CALL_ARGS):
            if token == ARG_BEGIN and state == _CALL_ID:
                self._state = _CALL_ARGS
            elif token in (CALL_END, CALL_BEGIN, *SECTION_END):
                self._finish_call(out)
                if token == CALL_BEGIN:
                    self._open_call()
                elif token in SECTION_END:
                    self._state = _CONTENT
            else:  # inside a call a control token is part of the id or arguments text
                self._text(token, out)
        elif token == CALL_BEGIN:
            self._implicit_section = state != _SECTION
            self._open_call()
        elif state == _SECTION:
            if token in SECTION_END:
                self._state = _CONTENT
        elif token == THINK_BEGIN:
            self._state = _REASONING
        elif token == THINK_END:
            self._state = _CONTENT
        elif token in SECTION_BEGIN:
            self._state, self._implicit_section = _SECTION, False
        # any other control token in reasoning or content is dropped

    def _open_call(self) -> None:
        self._call, self._state = [[], []], _CALL_ID

    def _finish_call(self, out: list[dict]) -> None:
        call = make_tool_call("".join(self._call[0]), "".join(self._call[1]))
        self._calls.append(call)
        out.append({"tool_calls": [{"index": len(self._calls) - 1, **copy.deepcopy(call)}]})
        self._call = None
        self._state = _CONTENT if self._implicit_section else _SECTION


def parse_assistant(text: str, thinking: bool = True) -> dict:
    """An OpenAI-format assistant message from the model's text: role, content, reasoning_content, tool_calls.

    content and reasoning_content are strings ('' when absent), tool_calls a list. Never raises on
    any text. thinking=False: the text starts in content (see StreamParser).
    """
    parser = StreamParser(thinking)
    parser.feed(text)
    parser.close()
    return parser.message
