"""chat.validate: OpenAI-format messages and tools are checked with errors naming the field; what real
OpenAI clients send (and what the engine's own parser and agent write) passes."""

import re

import pytest

from kimi_engine.chat import parse_assistant, render_chat_template
from kimi_engine.chat.validate import check_messages, check_tools
from kimi_engine.runtime.agent import tool_schema

CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def user(text="Weather in Paris?"):
    return {"role": "user", "content": text}


def get_weather(city: str) -> dict:
    """Current weather for a city."""
    return {"city": city}


# What clients send: the OpenAI SDK echoing a response message whole (model_dump() keeps None fields),
# content parts, names, Kimi's and vLLM's reasoning fields, tool results with a name, extra keys.
ACCEPTED = {
    "plain": [user()],
    "system-and-parts": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    "sdk-echo": [user(), {"role": "assistant", "content": None, "refusal": None, "audio": None,
                          "function_call": None, "annotations": [], "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": CALL["id"], "name": "get_weather", "content": '{"sky": "sunny"}'},
                 {"role": "assistant", "content": "Sunny.", "tool_calls": None, "refusal": None}],
    "content-absent-with-calls": [user(), {"role": "assistant", "tool_calls": [CALL]},
                                  {"role": "tool", "tool_call_id": CALL["id"],
                                   "content": [{"type": "text", "text": "x"}]}],
    "reasoning-fields": [user(), {"role": "assistant", "content": "a", "reasoning_content": "think"},
                         user("more"), {"role": "assistant", "content": "b", "reasoning": "vLLM's spelling"},
                         user("again"), {"role": "assistant", "content": "c", "reasoning_content": None}],
    "names-and-extra-keys": [{"role": "user", "name": "alice", "content": "hi", "metadata": {"x": 1}},
                             {"role": "assistant", "content": "", "tool_calls": []}],
    "arguments-as-object": [user(), {"role": "assistant", "content": "",
                                     "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {"a": 1}}}]}],
    "tuple": (user(),),
}


@pytest.mark.parametrize("messages", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepts_what_clients_send(messages):
    check_messages(messages)
    render_chat_template(list(messages), [TOOL])   # and the template renders all of it


def test_accepts_the_engines_own_transcript():
    """The parser's message (as run_agent appends it) and the tool results after it, sent back whole."""
    text = ('checking<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.f:1'
            '<|tool_call_argument_begin|>not json<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    parsed = parse_assistant(text)
    assistant = {"role": "assistant", "content": parsed["content"], "reasoning_content": parsed["reasoning_content"],
                 "tool_calls": [{k: v for k, v in c.items() if k != "error"} for c in parsed["tool_calls"]]}
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in parsed["tool_calls"]]
    check_messages([user(), assistant, *results, {"role": "assistant", "content": "Done."}])


def test_accepts_tool_schemas():
    check_tools(None)
    check_tools([])
    renamed = {"type": "function", "function": {**tool_schema(get_weather)["function"], "name": "get-weather_2"}}
    check_tools([TOOL, renamed,
                 {"type": "function", "function": {"name": "no_params"}},
                 {"type": "function", "function": {"name": "strict", "strict": True, "parameters": None},
                  "callable": get_weather}])


MESSAGE_ERRORS = {
    "not-a-list": ("hello", "messages must be a non-empty list of message dicts, got str"),
    "a-dict": ({"role": "user", "content": "x"}, "messages must be a non-empty list.*got dict"),
    "empty": ([], "messages must be a non-empty list.*got an empty list"),
    "none": (None, "messages must be a non-empty list.*got None"),
    "message-not-a-dict": ([user(), "hi"], r"messages\[1\] must be a message dict.*got str"),
    "no-role": ([user(), {"content": "x"}], r"messages\[1\]\.role is missing"),
    "role-none": ([{"role": None, "content": "x"}], r"messages\[0\]\.role is missing"),
    "role-not-a-string": ([{"role": 1, "content": "x"}], r"messages\[0\]\.role must be a string, got int"),
    "unknown-role": ([user(), user(), {"role": "wizard", "content": "x"}],
                     r"messages\[2\]\.role 'wizard' is not one of system, user, assistant, tool"),
    "content-int": ([{"role": "user", "content": 5}],
                    r"messages\[0\]\.content must be a string or a list of text parts, got int"),
    "content-dict": ([{"role": "user", "content": {"text": "x"}}], r"messages\[0\]\.content must be .*got dict"),
    "user-content-none": ([{"role": "user", "content": None}],
                          r"messages\[0\]\.content is missing or None: a user message needs content"),
    "user-content-absent": ([{"role": "system"}], r"messages\[0\]\.content is missing or None: a system message"),
    "assistant-none-no-calls": ([user(), {"role": "assistant", "content": None}],
                                r"messages\[1\]\.content is missing or None: an assistant message needs content"),
    "image-part": ([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                 {"type": "image_url", "image_url": {"url": "u"}}]}],
                   r"messages\[0\]\.content\[1\]\.type must be 'text'.*'image_url'"),
    "part-not-a-dict": ([{"role": "user", "content": ["x"]}], r"messages\[0\]\.content\[0\] must be a text part"),
    "part-text-missing": ([{"role": "user", "content": [{"type": "text"}]}],
                          r"messages\[0\]\.content\[0\]\.text must be a string, got None"),
    "name-not-a-string": ([{"role": "user", "content": "x", "name": 3}], r"messages\[0\]\.name must be a string"),
    "reasoning-not-a-string": ([user(), {"role": "assistant", "content": "x", "reasoning_content": ["a"]}],
                               r"messages\[1\]\.reasoning_content must be a string, got list"),
    "tool-calls-not-a-list": ([user(), {"role": "assistant", "content": "", "tool_calls": CALL}],
                              r"messages\[1\]\.tool_calls must be a list of tool calls, got dict"),
    "tool-call-not-a-dict": ([user(), {"role": "assistant", "content": "", "tool_calls": ["get_weather"]}],
                             r"messages\[1\]\.tool_calls\[0\] must be a tool call"),
    "tool-call-no-id": ([user(), {"role": "assistant", "tool_calls": [{k: v for k, v in CALL.items() if k != "id"}]}],
                        r"messages\[1\]\.tool_calls\[0\]\.id must be a string, got None"),
    "tool-call-empty-id": ([user(), {"role": "assistant", "tool_calls": [{**CALL, "id": ""}]}],
                           r"messages\[1\]\.tool_calls\[0\]\.id must not be empty"),
    "tool-call-type": ([user(), {"role": "assistant", "tool_calls": [{**CALL, "type": "retrieval"}]}],
                       r"messages\[1\]\.tool_calls\[0\]\.type must be 'function', got 'retrieval'"),
    "tool-call-no-function": ([user(), {"role": "assistant", "tool_calls": [{"id": "a", "type": "function"}]}],
                              r"messages\[1\]\.tool_calls\[0\]\.function must be a dict.*got None"),
    "tool-call-no-name": ([user(), {"role": "assistant", "tool_calls": [{**CALL, "function": {"arguments": "{}"}}]}],
                          r"messages\[1\]\.tool_calls\[0\]\.function\.name must be a string, got None"),
    "tool-call-arguments": ([user(), {"role": "assistant", "tool_calls": [
                                {**CALL, "function": {"name": "f", "arguments": 3}}]}],
                            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments must be a JSON string or an object"),
    "second-call-bad": ([user(), {"role": "assistant", "tool_calls": [CALL, {**CALL, "function": None}]}],
                        r"messages\[1\]\.tool_calls\[1\]\.function must be a dict"),
    "calls-on-a-user": ([{"role": "user", "content": "x", "tool_calls": [CALL]}],
                        r"messages\[0\]\.tool_calls: only assistant messages carry tool calls \(role is 'user'\)"),
    "tool-without-id": ([user(), {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x"}],
                        r"messages\[2\]\.tool_call_id must be a string, got None"),
    "tool-answers-nothing": ([user(), {"role": "assistant", "tool_calls": [CALL]},
                              {"role": "tool", "tool_call_id": "functions.get_weather:7", "content": "x"}],
                             r"messages\[2\]\.tool_call_id 'functions.get_weather:7' answers no tool call"),
    "tool-before-its-call": ([user(), {"role": "tool", "tool_call_id": CALL["id"], "content": "x"},
                              {"role": "assistant", "tool_calls": [CALL]}],
                             r"messages\[1\]\.tool_call_id .* answers no tool call of an earlier assistant message"),
    "tool-content-none": ([user(), {"role": "assistant", "tool_calls": [CALL]},
                           {"role": "tool", "tool_call_id": CALL["id"], "content": None}],
                          r"messages\[2\]\.content is missing or None: a tool message needs content"),
}


@pytest.mark.parametrize("messages, match", MESSAGE_ERRORS.values(), ids=MESSAGE_ERRORS.keys())
def test_bad_messages_name_the_field(messages, match):
    with pytest.raises(ValueError, match=match):
        check_messages(messages)


TOOL_ERRORS = {
    "not-a-list": (TOOL, "tools must be a list of OpenAI function tools, got dict"),
    "a-string": ("get_weather", "tools must be a list.*got str"),
    "bogus": ([{"bogus": 1}], r'tools\[0\]\.type must be "function".*got None'),
    "a-callable": ([TOOL, get_weather], r"tools\[1\] must be an OpenAI tool.*got function"),
    "bare-schema": ([TOOL["function"]], r'tools\[0\]\.type must be "function"'),
    "other-type": ([{"type": "code_interpreter"}], r"tools\[0\]\.type must be \"function\".*'code_interpreter'"),
    "no-function": ([{"type": "function"}], r"tools\[0\]\.function must be a dict.*got None"),
    "no-name": ([{"type": "function", "function": {"parameters": {}}}],
                r"tools\[0\]\.function\.name must be a string, got None"),
    "empty-name": ([{"type": "function", "function": {"name": ""}}], r"tools\[0\]\.function\.name must not be empty"),
    "name-with-a-colon": ([TOOL, {"type": "function", "function": {"name": "a:b"}}],
                          r"tools\[1\]\.function\.name 'a:b' must be 1-64 letters, digits"),
    "name-too-long": ([{"type": "function", "function": {"name": "f" * 65}}], r"tools\[0\]\.function\.name 'f+'"),
    "duplicate": ([TOOL, {"type": "function", "function": {"name": "other"}}, TOOL],
                  r"tools\[2\]\.function\.name 'get_weather' is declared twice \(also tools\[0\]\)"),
    "description": ([{"type": "function", "function": {"name": "f", "description": 1}}],
                    r"tools\[0\]\.function\.description must be a string, got int"),
    "parameters-list": ([{"type": "function", "function": {"name": "f", "parameters": ["city"]}}],
                        r"tools\[0\]\.function\.parameters must be a JSON-schema object, got list"),
    "parameters-type": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                        r"tools\[0\]\.function\.parameters\.type must be 'object', got 'string'"),
}


@pytest.mark.parametrize("tools, match", TOOL_ERRORS.values(), ids=TOOL_ERRORS.keys())
def test_bad_tools_name_the_field(tools, match):
    with pytest.raises(ValueError, match=match):
        check_tools(tools)


def test_every_message_error_names_a_field_path():
    """The message leads with the path of the field (messages, messages[i], messages[i].x[j].y)."""
    for messages, _ in MESSAGE_ERRORS.values():
        with pytest.raises(ValueError) as info:
            check_messages(messages)
        assert re.match(r"messages(\[\d+\](\.\w+(\[\d+\])?)*)?[ :]", str(info.value)), str(info.value)
