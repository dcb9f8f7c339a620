"""Constrained decoding (kimi_engine/runtime/grammar.py): llguidance grammars over Kimi's tokenizer.

Unit tests drive matchers by hand on the demo tokenizer; the model tests run the real demo model
through engine.generate / engine.chat with Grammar.logits_processor(). The demo model (trained on
Shakespeare) never writes a tool call or JSON by itself, so every call and every JSON value below
exists only because the grammar forced it, and jsonschema (test-only) checks each one.
"""

import json
import re
import threading

import jsonschema
import pytest
import torch

import kimi_engine as ke
from kimi_engine.chat import parse_assistant
from kimi_engine.demo import demo_path
from kimi_engine.runtime.grammar import GrammarCompiler, apply_masks
from kimi_engine.chat.tokenizer import KIMI_SPECIAL_TOKENS, load_tokenizer, write_kimi_tokenizer

TOOL_TOKENS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>",
               "<|tool_call_end|>", "<|tool_calls_section_end|>")

# Schemas the tool-call tests sample under: nested objects, arrays, enums, integers, required and
# optional fields, additionalProperties false. Strings and arrays are bounded so that a model that
# never closes a string by itself still ends within max_new_tokens.
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["C", "F"]}},
        "required": ["city"], "additionalProperties": False},
    "add": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -50, "maximum": 50},
        "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False},
    "book": {"type": "object", "properties": {
        "guest": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name"], "additionalProperties": False},
        "nights": {"type": "integer", "minimum": 1, "maximum": 30}},
        "required": ["guest", "nights"], "additionalProperties": False},
    "tag": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "pinned": {"type": "boolean"}},
        "required": ["tags"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "Help me, good sir."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(demo_path())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


@pytest.fixture(scope="module")
def engine():
    # n=10: the tool-call test's 50 samples in 5 requests.
    return ke.load(device="cpu", dtype=torch.float32, progress=False, max_batch_size=10)


def ids(tokenizer, text):
    return tokenizer.encode(text)


def feed(matcher, tokenizer, text):
    for token in tokenizer.encode(text):
        matcher.accept(token)


def special(tokenizer, name):
    return tokenizer.special_tokens[name]


def call_text(name, index, args):
    return (f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{json.dumps(args)}"
            "<|tool_call_end|>")


# ------------------------------------------------------------------------------------------------
# Matchers by hand, on the demo tokenizer (no model)

def test_required_tool_call_turn_token_by_token(compiler, tokenizer):
    g = compiler.compile(tools=TOOLS, tool_choice="required", thinking=True, first_call_index=3)
    m = g.matcher()
    sp = lambda name: special(tokenizer, name)  # noqa: E731
    # Reasoning first: <think> optional, then text or </think>; no tool token and no end yet.
    allowed = set(m.allowed_token_ids())
    assert {sp("<think>"), sp("</think>")} <= allowed
    assert not allowed & {sp(t) for t in TOOL_TOKENS} and not allowed & compiler.eos_token_ids
    feed(m, tokenizer, "<think>The user wants weather.</think>")
    assert m.allowed_token_ids() == [sp("<|tool_calls_section_begin|>")]   # no content: the call is forced
    feed(m, tokenizer, "<|tool_calls_section_begin|>" + call_text("get_weather", 3, {"city": "Paris"}))
    assert set(m.allowed_token_ids()) == {sp("<|tool_call_begin|>"), sp("<|tool_calls_section_end|>")}
    with pytest.raises(ValueError, match="not allowed"):     # the second call must carry index 4
        feed(m, tokenizer, "<|tool_call_begin|>functions.add:3")
    m.reset()
    feed(m, tokenizer, "<think>The user wants weather.</think><|tool_calls_section_begin|>"
         + call_text("get_weather", 3, {"city": "Paris"}) + call_text("add", 4, {"a": -2, "b": 7})
         + "<|tool_calls_section_end|>")
    assert set(m.allowed_token_ids()) == compiler.eos_token_ids        # only the end of the turn is left
    assert not m.is_finished() and m.is_complete()
    m.accept(tokenizer.eos_token_id)
    assert m.is_finished()
    with pytest.raises(ValueError, match="after the grammar finished"):
        m.accept(ids(tokenizer, "a")[0])


def test_arguments_follow_the_schema(compiler, tokenizer):
    g = compiler.compile(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}, thinking=False)
    start = "<|tool_calls_section_begin|><|tool_call_begin|>functions."
    for bad in ('get_weather:0', 'add:0<|tool_call_argument_begin|>{"a": 1, "c"',          # other tool, extra key
                'add:0<|tool_call_argument_begin|>{"a": 51',                               # above maximum
                'add:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|>',              # b is required
                'add:0<|tool_call_argument_begin|>{"a": "1"'):                             # a string
        m = g.matcher()
        with pytest.raises(ValueError, match="not allowed"):
            feed(m, tokenizer, start + bad)
    m = g.matcher()
    feed(m, tokenizer, start + 'add:12<|tool_call_argument_begin|>{"a": -50, "b": 0}<|tool_call_end|>')
    # parallel calls: a second call or the end of the section
    assert special(tokenizer, "<|tool_call_begin|>") in m.allowed_token_ids()
    one = compiler.compile(tools=TOOLS, tool_choice="required", thinking=False, parallel_tool_calls=False).matcher()
    feed(one, tokenizer, start + 'add:0<|tool_call_argument_begin|>{"a":1,"b":2}<|tool_call_end|>')
    assert one.allowed_token_ids() == [special(tokenizer, "<|tool_calls_section_end|>")]


def test_auto_constrains_only_strict_arguments(compiler, tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "strict": True, "parameters": SCHEMAS["add"]}},
             {"type": "function", "function": {"name": "loose", "parameters": SCHEMAS["add"]}}]
    assert compiler.compile(tools=TOOLS, tool_choice="auto") is None         # no strict tool: nothing to do
    g = compiler.compile(tools=tools, tool_choice="auto", thinking=False)
    m = g.matcher()
    assert compiler.eos_token_ids <= set(m.allowed_token_ids())   # the model may answer nothing and stop
    feed(m, tokenizer, "Let me add.")                               # free content, then a call or the end
    assert {special(tokenizer, "<|tool_calls_section_begin|>"), *compiler.eos_token_ids} <= set(m.allowed_token_ids())
    fork = m.fork()
    feed(fork, tokenizer, "<|tool_calls_section_begin|>" + call_text("loose", 0, "not json at all")
         + "<|tool_calls_section_end|>")                            # a non-strict tool's arguments are free
    with pytest.raises(ValueError, match="not allowed"):
        feed(m, tokenizer, "<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0"
             "<|tool_call_argument_begin|>not json")
    m.reset()
    feed(m, tokenizer, "ok<|tool_calls_section_begin|>" + call_text("add", 0, {"a": 1, "b": 2})
         + "<|tool_calls_section_end|>")
    m.accept(tokenizer.eos_token_id)
    assert m.is_finished()


def test_none_forbids_every_tool_token(compiler, tokenizer):
    g = compiler.compile(tools=TOOLS, tool_choice="none", thinking=True)
    forbidden = {special(tokenizer, t) for t in TOOL_TOKENS}
    m = g.matcher()
    for text in ["<think>", "I think", "</think>", "Fair", " words."]:
        assert not forbidden & set(m.allowed_token_ids())
        feed(m, tokenizer, text)
    assert compiler.eos_token_ids <= set(m.allowed_token_ids())
    with pytest.raises(ValueError, match="not allowed"):
        m.accept(special(tokenizer, "<|tool_calls_section_begin|>"))


def test_response_format_and_plain_json_schema(compiler, tokenizer):
    schema = SCHEMAS["book"]
    g = compiler.compile(response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": schema}},
                         thinking=True)
    m = g.matcher()
    feed(m, tokenizer, '<think>hmm</think>{"guest": {"name": "Ann"}, "nights": 2}')
    m.accept(tokenizer.eos_token_id)
    assert m.is_finished()
    plain = compiler.compile(json_schema=json.dumps(schema)).matcher()     # JSON text works too
    with pytest.raises(ValueError, match="not allowed"):
        feed(plain, tokenizer, '{"guest": {"name": "Ann"}, "nights": 0')   # below minimum
    any_object = compiler.compile(response_format={"type": "json_object"}, thinking=False).matcher()
    feed(any_object, tokenizer, '{"x": [1, {"y": null}]}')
    assert any_object.is_complete()
    assert compiler.compile(response_format={"type": "text"}) is None
    regex = compiler.compile(regex=r"(yes|no)!").matcher()
    feed(regex, tokenizer, "no!")
    assert set(regex.allowed_token_ids()) == compiler.eos_token_ids


def test_lark_grammar_can_force_special_tokens(compiler, tokenizer):
    g = compiler.compile(grammar='start: "Thus" <|im_end|> WORD\nWORD: /[a-z]+/')
    m = g.matcher()
    feed(m, tokenizer, "Thus")
    assert m.allowed_token_ids() == [special(tokenizer, "<|im_end|>")]
    m.accept(special(tokenizer, "<|im_end|>"))      # named by the grammar: accepted as its token
    assert m.is_finished()                          # and, an end token, it ends the sequence


def test_think_markers_as_text_when_not_special_tokens(tokenizer, tmp_path):
    """A vocabulary without <think>/</think> specials: the reasoning ends at the text "</think>"."""
    specials = {k: v for k, v in KIMI_SPECIAL_TOKENS.items() if v not in ("<think>", "</think>")}
    base = tokenizer.token_bytes[:tokenizer.vocab_size - len(tokenizer.special_tokens)]
    plain = load_tokenizer(write_kimi_tokenizer(tmp_path, base, specials))
    assert "</think>" not in plain.special_tokens
    g = GrammarCompiler(plain, plain.vocab_size).compile(tools=TOOLS, tool_choice="required", thinking=True)
    m = g.matcher()
    feed(m, plain, "<think>I ponder <thin")
    assert special(plain, "<|tool_calls_section_begin|>") not in m.allowed_token_ids()   # still reasoning
    feed(m, plain, "k> and more</think>")
    assert m.allowed_token_ids() == [special(plain, "<|tool_calls_section_begin|>")]


def test_padding_ids_are_never_allowed(tokenizer):
    padded = GrammarCompiler(tokenizer, tokenizer.vocab_size + 40)        # model rows past the tokenizer
    pad = tokenizer.vocab_size + 3
    # Even a grammar that names a padding id by number does not let it through.
    m = padded.compile(grammar=f'start: <[{pad}]> | "a"').matcher()
    allowed = m.allowed_token_ids()
    assert allowed and max(allowed) < tokenizer.vocab_size
    with pytest.raises(ValueError):
        m.accept(pad)
    free = torch.randn(2, padded.vocab_size)
    logits = free.clone()
    apply_masks(logits, [None, m])
    assert torch.equal(logits[0], free[0])                                # a free row keeps its padding logits
    assert torch.isinf(logits[1, tokenizer.vocab_size:]).all()
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarCompiler(tokenizer, tokenizer.vocab_size - 1)


BAD = [
    (dict(json_schema={"type": "foo"}), "json_schema"),
    (dict(json_schema={"not": {"type": "string"}}), "json_schema"),                 # unsupported keyword
    (dict(json_schema="{not json"), "json_schema"),
    (dict(json_schema=[1]), "json_schema"),
    (dict(regex="a(b"), "regex"),
    (dict(regex=""), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(json_schema={"type": "object"}, regex="a"), "regex"),                     # two at once
    (dict(regex="a", grammar='start: "a"'), "grammar"),
    (dict(json_schema={"type": "object"}, tools=TOOLS), "json_schema"),             # plain + chat
    (dict(tool_choice="required"), "tool_choice"),                                   # without tools
    (dict(tool_choice={"type": "function", "function": {"name": "add"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice"),
    (dict(tools={"add": {}}), "tools"),
    (dict(tools=[TOOLS[0], {"type": "retrieval"}]), r"tools\[1\]"),
    (dict(tools=[TOOLS[0], {"type": "function", "function": {"name": ""}}]), r"tools\[1\]"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), r"tools\[1\]"),                               # a name twice
    (dict(tools=[TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}],
          tool_choice="required"), r"tools\[1\]"),
    (dict(tools=[TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": {"type": "object",
          "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}], tool_choice="required"),
     r"tools\[1\]"),
    (dict(tools=[{"type": "function", "function": {"name": "x", "strict": "yes"}}]), r"tools\[0\]"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "foo"}}}),
     "response_format"),
    (dict(tools=TOOLS, tool_choice="required", first_call_index=-1), "first_call_index"),
    (dict(tools=TOOLS, tool_choice="required", parallel_tool_calls="no"), "parallel_tool_calls"),
    (dict(response_format={"type": "json_object"}, thinking="yes"), "thinking"),
]


@pytest.mark.parametrize("kwargs,argument", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_bad_requests_name_their_argument(compiler, kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}(?=[:=])"):
        compiler.compile(**kwargs)


def test_fork_and_reset(compiler, tokenizer):
    g = compiler.compile(json_schema=SCHEMAS["tag"])
    m = g.matcher()
    start = m.allowed_token_ids()
    feed(m, tokenizer, '{"tags": [')
    fork = m.fork()
    assert fork.allowed_token_ids() == m.allowed_token_ids()
    feed(fork, tokenizer, '"red"]}')
    assert fork.is_complete() and not m.is_complete()                  # the fork moved on alone
    feed(m, tokenizer, '"blue", "green"')                           # m goes on from where the fork left it
    m.reset()
    assert m.allowed_token_ids() == start and not m.is_complete()
    # After a preemption the scheduler re-accepts the same tokens and gets the same state back.
    feed(m, tokenizer, '{"tags": [')
    again = g.matcher()
    feed(again, tokenizer, '{"tags": [')
    assert m.allowed_token_ids() == again.allowed_token_ids()


def test_compile_caches_and_is_thread_safe(compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    results, errors = [], []

    def work():
        try:
            results.append(compiler.compile(json_schema=schema))
        except Exception as e:   # collected: an assertion in a thread would not fail the test
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r is results[0] for r in results) and compiler.compile(json_schema=dict(schema)) is results[0]


def test_mixed_batch_rows_equal_each_row_alone(compiler, tokenizer, engine):
    """One apply_masks call over free and constrained rows (different grammars and states) gives each
    row what masking it alone gives; free rows are untouched."""
    prompts = ["ROMEO:", "JULIET: O", "KING HENRY:", "First Citizen:", "MERCUTIO:"]
    logits = torch.stack([engine.logits(tokenizer.encode(p))[-1] for p in prompts])   # real model rows
    a = compiler.compile(json_schema=SCHEMAS["book"]).matcher()
    feed(a, tokenizer, '{"guest": {"name": "')
    b = compiler.compile(tools=TOOLS, tool_choice="required", thinking=False).matcher()
    c = compiler.compile(regex="[0-9]{3}").matcher()
    feed(c, tokenizer, "4")
    matchers = [None, a, b, None, c]
    batch = logits.clone()
    apply_masks(batch, matchers)
    for row, m in enumerate(matchers):
        alone = logits[row:row + 1].clone()
        if m is not None:
            apply_masks(alone, [m])
            assert torch.isinf(alone).any()
        assert torch.equal(batch[row], alone[0]), row
    with pytest.raises(ValueError, match="share memory"):
        apply_masks(logits[:1].expand(3, -1), [a, None, None])
    with pytest.raises(ValueError, match="expected"):
        apply_masks(logits, [a])


# ------------------------------------------------------------------------------------------------
# The demo model through today's engine.generate / engine.chat

def check_call(call, schemas, index=None):
    assert "error" not in call, call
    name = call["function"]["name"]
    assert name in schemas
    if index is not None:
        assert call["id"] == f"functions.{name}:{index}"
    else:
        assert re.fullmatch(rf"functions\.{name}:\d+", call["id"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])


def test_forced_tool_calls_parse_and_validate(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.config.vocab_size)
    runs = [({"type": "function", "function": {"name": name}}, seed) for seed, name in enumerate(SCHEMAS)]
    runs += [("required", 10)]
    samples, names = 0, set()
    for choice, seed in runs:
        g = compiler.compile(tools=TOOLS, tool_choice=choice, thinking=False, first_call_index=2,
                             parallel_tool_calls=False)
        # The prompt leaves the declarations out: the demo model cannot read them, and ~870 prompt tokens
        # of them would make each of the 10 paths' decode steps attend over a 10x longer cache.
        messages = engine.chat(MESSAGES, tools=None, thinking=False, n=10, seed=seed, max_new_tokens=60,
                               temperature=1.0, logits_processors=[g.logits_processor()])
        for message in messages:
            assert len(message["tool_calls"]) == 1, message         # finished, one call
            call = message["tool_calls"][0]
            check_call(call, SCHEMAS, index=2)
            if choice != "required":
                assert call["function"]["name"] == choice["function"]["name"]
            samples += 1
            names.add(call["function"]["name"])
    assert samples == 50 and names == set(SCHEMAS)


def test_parallel_required_calls_count_from_first_call_index(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.config.vocab_size)
    g = compiler.compile(tools=TOOLS, tool_choice="required", thinking=False, first_call_index=5)
    messages = engine.chat(MESSAGES, tools=None, thinking=False, n=4, seed=3, max_new_tokens=100,  # short prompt
                           temperature=1.0, logits_processors=[g.logits_processor()])
    for message in messages:    # a turn cut off by max_new_tokens keeps its complete calls
        assert message["tool_calls"]
        for k, call in enumerate(message["tool_calls"]):
            check_call(call, SCHEMAS, index=5 + k)


def test_json_schema_generation_validates(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.config.vocab_size)
    for seed, name in enumerate(["book", "tag"]):
        g = compiler.compile(json_schema=SCHEMAS[name])
        outs = engine.generate("ROMEO:", n=4, seed=seed, max_new_tokens=50, temperature=1.0,
                               logits_processors=[g.logits_processor()])
        for out in outs:
            assert out.finish_reason == "stop" and out.token_ids[-1] in compiler.eos_token_ids, out
            jsonschema.validate(json.loads(out.text), SCHEMAS[name])
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMAS["add"]}}
    g = compiler.compile(response_format=response_format, thinking=False)
    for message in engine.chat(MESSAGES, thinking=False, n=4, seed=7, max_new_tokens=40, temperature=1.0,
                               logits_processors=[g.logits_processor()]):
        jsonschema.validate(json.loads(message["content"]), SCHEMAS["add"])
        assert message["tool_calls"] == []


def test_none_never_calls_even_when_the_model_wants_to(engine):
    tokenizer = engine.tokenizer
    compiler = GrammarCompiler(tokenizer, engine.config.vocab_size)
    tool_ids = torch.tensor([special(tokenizer, t) for t in TOOL_TOKENS])

    def eager(token_ids, row):         # a model that would open a tool call at every step
        row = row.clone()
        row[tool_ids] += 100.0
        return row
    prompt = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)   # short: no declarations
    unconstrained = engine.generate(prompt, max_new_tokens=3, seed=0, logits_processors=[eager])
    assert set(unconstrained.token_ids) & set(tool_ids.tolist())       # so the check below can fail
    g = compiler.compile(tools=TOOLS, tool_choice="none", thinking=True)
    outs = engine.generate(prompt, n=4, max_new_tokens=30, seed=0, logits_processors=[eager, g.logits_processor()])
    for out in outs:
        assert not set(out.token_ids) & set(tool_ids.tolist())
        assert parse_assistant(out.text)["tool_calls"] == []


def test_constrained_request_gives_the_same_tokens_alone_and_in_a_batch(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.config.vocab_size)
    g = compiler.compile(json_schema=SCHEMAS["add"])
    kwargs = dict(max_new_tokens=30, seed=5, temperature=1.0)
    alone = [engine.generate(p, logits_processors=[g.logits_processor()], **kwargs) for p in ("ROMEO:", "JULIET:")]
    batch = engine.generate(["ROMEO:", "JULIET:"], logits_processors=[g.logits_processor()], **kwargs)
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]


def test_objects_that_leave_additional_properties_unsaid_are_closed():
    from kimi_engine.runtime.grammar import closed_objects
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}},
                                               "open": {"type": "object", "additionalProperties": True}},
              "$defs": {"x": {"type": "object", "properties": {}}, "any": {"type": "object"}},
              "anyOf": [{"type": "object", "properties": {}}],
              "allOf": [{"type": "object", "properties": {"e": {}}}]}
    closed = closed_objects(schema)
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True           # said: kept
    assert closed["$defs"]["x"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["$defs"]["any"]                    # any object stays any object
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed                                     # it has an allOf
    assert closed["allOf"] == schema["allOf"] and "additionalProperties" not in schema   # input untouched
