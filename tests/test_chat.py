"""Chat: templates render as HF transformers renders them (sandboxed), and the assistant parser keeps
every rule the peers (vLLM, SGLang, llama.cpp) learned late, streaming or not."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.exceptions import SecurityError, TemplateError

from kimi_engine.chat import builtin_chat_template, render_chat_template
from kimi_engine.chat.parser import MESSAGE_END, OTHER_CONTROL, SECTION_BEGIN, SECTION_END, StreamParser, parse_assistant
from kimi_engine.chat.tokenizer import Tokenizer

from .conftest import data_file
from .tokenizer_helpers import (FIXTURE_TEMPLATE, kimi_dir, kimi_vocab,  # noqa: F401
                                tiktoken_reference, write_kimi_dir)

# --- rendering --------------------------------------------------------------------------------

COMPACT_TOOLS = "{{ tools | tojson(separators=(',', ':')) }}"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Météo actuelle / 当前天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALLS = [{"id": "functions.get_weather:0", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},          # arguments as a string
         {"id": "functions.get_weather:1", "type": "function",
          "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]              # ... and as a dict
CONVERSATIONS = {
    "no system prompt": ([{"role": "user", "content": "Hi"}], None),
    "system prompt": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    "multi-turn, old reasoning dropped": ([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "OLD-1", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "reasoning": "OLD-2", "content": "6", "name": "kimi"},
        {"role": "user", "content": [{"type": "text", "text": "and 4+4?"}]}], None),
    "tool declarations": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    "tool calls and results": ([
        {"role": "user", "content": "Weather in Paris and Beijing?"},
        {"role": "assistant", "reasoning_content": "KEEP-ME", "content": None, "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18°C"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": [{"type": "text", "text": "25°C"}]}],
        [WEATHER]),
}


def hf_render(backend, template, messages, tools=None, add_generation_prompt=False, **kwargs):
    """HF transformers' own apply_chat_template (test-only dependency)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="<|im_end|>")
    return hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
                                  chat_template=template, **kwargs)


@pytest.fixture(scope="module")
def fixture_template():
    return data_file(FIXTURE_TEMPLATE).read_text(encoding="utf-8")


def test_builtin_template_is_hfs_original(fixture_template):
    """The package copy is the fixture with HF's compact-JSON tool line, plus a leading provenance comment."""
    assert fixture_template.count("{{ tools | tojson() }}") == 1
    builtin = builtin_chat_template()
    assert builtin.startswith("{#-") and "Kimi K2 Thinking" in builtin[:builtin.index("-#}")]
    assert builtin[builtin.index("-#}") + 4:] == fixture_template.replace("{{ tools | tojson() }}", COMPACT_TOOLS)


@pytest.mark.parametrize("builtin", [False, True], ids=["fixture template", "built-in template"])
@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_rendering_equals_hf(kimi_vocab, fixture_template, tmp_path, case, generation_prompt, builtin):
    messages, tools = CONVERSATIONS[case]
    tok = Tokenizer.from_pretrained(write_kimi_dir(tmp_path, kimi_vocab, None if builtin else fixture_template))
    reference = fixture_template.replace("{{ tools | tojson() }}", COMPACT_TOOLS) if builtin else fixture_template
    expected = hf_render(tok.backend, reference, messages, tools, generation_prompt)
    assert tok.apply_chat_template(messages, tools, add_generation_prompt=generation_prompt, tokenize=False) == expected
    ids = tok.apply_chat_template(messages, tools, add_generation_prompt=generation_prompt)
    assert ids == tiktoken_reference(kimi_vocab).encode(expected, allowed_special="all")
    if case.startswith("multi-turn"):
        assert "OLD-" not in expected and expected.count("<think></think>") == 2
    if case.startswith("tool calls"):
        assert "KEEP-ME" in expected and '{"city": "北京"}' in expected
    if tools:   # HF's original writes the declarations as compact JSON; the llama.cpp copy does not
        assert ('[{"type":"function"' in expected) == builtin


def test_template_sources(kimi_vocab, tmp_path):
    directory = write_kimi_dir(tmp_path, kimi_vocab)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                               {"name": "x", "template": "X"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    hi = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_pretrained(directory).apply_chat_template(hi, tokenize=False) == "D1"
    (directory / "chat_template.jinja").write_text("J{{ bos_token }}{{ add_generation_prompt }}")  # the file wins
    tok = Tokenizer.from_pretrained(directory)
    assert tok.apply_chat_template(hi, tokenize=False) == "J[BOS]False"
    assert tok.apply_chat_template(hi, tokenize=False, bos_token="B", add_generation_prompt=True) == "JBTrue"


def test_hf_template_features_match_hf(kimi_dir):
    template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.skip %}{% continue %}"
                "{% endif %}{{ m | tojson(indent=2, sort_keys=True, ensure_ascii=True) }}|{{ m | tojson }}|"
                "{{ m | tojson(separators=(',', ':')) }}{% set ns = namespace(n=1) %}{{ ns.n }}{% endfor %}"
                "{% generation %}{{ extra }}{% endgeneration %}")
    messages = [{"role": "user", "content": "é <b>&</b>"}, {"role": "user", "content": "x", "skip": True},
                {"role": "user", "content": "never"}]
    tok = Tokenizer.from_pretrained(kimi_dir)
    tok.chat_template = template
    expected = hf_render(tok.backend, template, messages, extra="E")
    assert tok.apply_chat_template(messages, tokenize=False, extra="E") == expected and "never" not in expected


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{{ ''.__class__ }}",
                                      "{{ messages.__class__.__base__.__subclasses__() }}",
                                      "{{ messages.append(1) }}", "{% set ns = namespace(_x=1) %}",
                                      "{{ cycler.__init__.__globals__ }}"])
def test_template_cannot_reach_python_internals(template):
    with pytest.raises(SecurityError):
        render_chat_template([{"role": "user", "content": "hi"}], chat_template=template)


def test_raise_exception_and_bad_input():
    with pytest.raises(TemplateError, match="no tools"):
        render_chat_template([{"role": "user"}], chat_template="{{ raise_exception('no tools') }}")
    with pytest.raises(ValueError, match="empty"):
        render_chat_template([])
    with pytest.raises(TypeError, match="OpenAI"):
        render_chat_template(["hi"])


# --- parsing ----------------------------------------------------------------------------------

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(idx, name, args):
    return f"{CB}functions.{name}:{idx}{AB}{args}{CE}"


def test_reasoning_may_begin_without_think():
    for prefix in ("", "<think>"):
        m = parse_assistant(prefix + "Let me think.</think>The answer is 4.<|im_end|>")
        assert (m["reasoning_content"], m["content"], m["tool_calls"]) == ("Let me think.", "The answer is 4.", [])
    assert parse_assistant("Just content.", thinking=False)["content"] == "Just content."
    assert parse_assistant("<think>r</think>c", thinking=False)["reasoning_content"] == "r"


def test_reasoning_ends_at_the_tool_section():
    m = parse_assistant("I should check the weather." + SB + call(0, "get_weather", '{"city": "Paris"}') + SE)
    assert m["reasoning_content"] == "I should check the weather." and m["content"] == ""
    assert m["tool_calls"] == [{"id": "functions.get_weather:0", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


def test_several_calls_in_one_section():
    text = ("r</think>Checking." + SB + call(0, "get_weather", '{"city": "Paris"}') + " \n"
            + call(1, "mcp:search:web", '{"q": "a<b>c"}') + f"{CB} functions.noargs:2 {AB} {{}} {CE}" + SE + "Done.")
    m = parse_assistant(text)
    assert [c["function"]["name"] for c in m["tool_calls"]] == ["get_weather", "mcp:search:web", "noargs"]
    assert [c["id"] for c in m["tool_calls"]] == ["functions.get_weather:0", "functions.mcp:search:web:1",
                                                  "functions.noargs:2"]
    assert m["tool_calls"][1]["function"]["arguments"] == '{"q": "a<b>c"}'
    assert m["content"] == "Checking.Done." and not any("error" in c for c in m["tool_calls"])


@pytest.mark.parametrize("args, problem", [("{not json", "not valid JSON"), ('{"a": NaN}', "not valid JSON"),
                                           ("[1, 2]", "not a JSON object"), ("", "not valid JSON"),
                                           ("[" * 100_000, "not valid JSON")])
def test_bad_arguments_are_kept_raw_and_flagged(args, problem):
    m = parse_assistant(SB + call(0, "f", args) + call(1, "g", '{"ok": true}') + SE)
    bad, good = m["tool_calls"]
    assert bad["function"]["arguments"] == args.strip() and problem in bad["error"]
    assert "error" not in good


def test_cut_off_section_keeps_the_complete_calls():
    first = call(0, "a", '{"x": 1}')
    for tail in ("", CB, CB + "functions.b:1", CB + "functions.b:1" + AB + '{"y": ', CB + "functions.b:1" + AB + "{}"):
        m = parse_assistant("r" + SB + first + tail)
        assert [c["id"] for c in m["tool_calls"]] == ["functions.a:0"], tail
    # A call whose end token is missing still ends at the next call or at the section end.
    m = parse_assistant(SB + f"{CB}functions.a:0{AB}{{}}" + call(1, "b", "{}") + f"{CB}functions.c:2{AB}{{}}" + SE)
    assert [c["function"]["name"] for c in m["tool_calls"]] == ["a", "b", "c"]


def test_bare_call_and_singular_section_tokens():
    m = parse_assistant("r</think>before " + call(0, "a", "{}") + " after")    # no section wrapper
    assert (m["content"], len(m["tool_calls"])) == ("before  after", 1)
    m = parse_assistant("<|tool_call_section_begin|>" + call(0, "a", "{}") + "<|tool_call_section_end|>x")
    assert (m["content"], len(m["tool_calls"])) == ("x", 1)


def test_no_control_token_leaks():
    text = ("<think>a<|im_middle|>b<|reserved_token_163600|></think>c[BOS]d" + SB + "junk" + call(0, "f", "{}")
            + "<think>" + SE + "e" + CE + AB + SE + "f<|im_end|>after the end" + SB + call(1, "g", "{}"))
    m = parse_assistant(text)
    assert (m["reasoning_content"], m["content"], len(m["tool_calls"])) == ("ab", "cdef", 1)


def test_stream_deltas():
    parser, deltas = StreamParser(), []
    for ch in "<think>hi</think>yo" + call(0, "f", '{"a": 1}') + "<|im_end|>":
        deltas += parser.feed(ch)
    deltas += parser.close()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hi"
    assert "".join(d.get("content", "") for d in deltas) == "yo"
    assert [d["tool_calls"] for d in deltas if "tool_calls" in d] == [[{
        "index": 0, "id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]]
    # A possible start of a control token is held back until the next delta decides it.
    parser = StreamParser(thinking=False)
    assert parser.feed("a<|tool_ca") == [{"content": "a"}] and parser.feed("ll_be") == []
    assert parser.feed("x<") == [{"content": "<|tool_call_bex"}] and parser.close() == [{"content": "<"}]


def test_char_by_char_streaming_equals_one_shot():
    # Every cut point of a text touching every rule, including reserved tokens whose id has no fixed length.
    text = ("<think>a<|reserved_token_163600|>b<|reserved_token_1<|im_middle|></think>c[BO" + SB + "junk"
            + call(0, "f", '{"x": "<think>"}') + f"{CB}functions.g:1{AB}{{}}" + SE + "<|tool_call_e<|reserved_"
            + call(2, "h", "{bad") + "[EOS]tail")
    for thinking in (True, False):
        parser, deltas = StreamParser(thinking), []
        for ch in text:
            deltas += parser.feed(ch)
        deltas += parser.close()
        assert parser.message == _merge(deltas) == parse_assistant(text, thinking)


def test_render_then_parse_round_trips(kimi_dir):
    message = {"role": "assistant", "reasoning_content": "Need weather.", "content": "Let me look.",
               "tool_calls": [CALLS[0]]}
    text = render_chat_template([{"role": "user", "content": "Weather?"}, message])
    header = "<|im_assistant|>assistant<|im_middle|>"
    generated = text[text.rindex(header) + len(header):]
    assert parse_assistant(generated) == message


# --- properties -------------------------------------------------------------------------------

CONTROLS = ["<think>", "</think>", CB, AB, CE, *SECTION_BEGIN, *SECTION_END, *MESSAGE_END, *OTHER_CONTROL,
            "<|reserved_token_7|>"]
FRAGMENTS = [*CONTROLS, *[c[:k] for c in CONTROLS for k in (1, 3, len(c) - 1)],
             *[c[k:] for c in CONTROLS for k in (2, 5)],
             "<|reserved_token_", "123", "functions.get:0", "functions.a:b:1", '{"a": 1}', "{bad", " ", "\n"]
kimi_like = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=30).map("".join)


def _merge(deltas):
    m = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
    for d in deltas:
        m["content"] += d.get("content", "")
        m["reasoning_content"] += d.get("reasoning_content", "")
        m["tool_calls"] += [{k: v for k, v in c.items() if k != "index"} for c in d.get("tool_calls", [])]
    return m


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), kimi_like), st.booleans())
def test_parse_never_raises(text, thinking):
    m = parse_assistant(text, thinking)
    assert isinstance(m["content"], str) and isinstance(m["reasoning_content"], str)


@settings(max_examples=400, deadline=None)
@given(kimi_like, st.lists(st.integers(0, 200), max_size=12), st.booleans())
def test_streaming_equals_one_shot(text, cuts, thinking):
    cuts = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    parser, deltas = StreamParser(thinking), []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.close()
    expected = parse_assistant(text, thinking)
    assert parser.message == expected and _merge(deltas) == expected


# Text around control tokens without '<' or '[' (text that spells a token across a dropped one
# is the model's own writing, and stays).
plain_around_controls = st.lists(st.one_of(st.sampled_from(CONTROLS), st.text(st.characters(blacklist_characters="<["),
                                                                                max_size=5)), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(plain_around_controls)
def test_control_tokens_never_reach_content_or_reasoning(text):
    m = parse_assistant(text)
    assert not any(c in m["content"] or c in m["reasoning_content"] for c in CONTROLS)
