"""kimi-engine serve, driven by the official openai client over a real loopback server on the demo model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.server_helpers import MODEL, demo_engine, running_server, wait_until

openai = pytest.importorskip("openai")

NO_THINK = {"chat_template_kwargs": {"thinking": False}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["tz"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine():
    return demo_engine()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _needs(engine, method: str, argument: str):
    import importlib.util
    import inspect
    if argument not in inspect.signature(getattr(engine, method)).parameters:
        pytest.skip(f"engine.{method} has no {argument} yet")
    if argument != "logprobs" and importlib.util.find_spec("kimi_engine.runtime.grammar") is None:
        pytest.skip("no constrained decoding in this engine build yet (runtime/grammar.py)")


def test_chat_returns_a_message_and_usage(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=12, temperature=0, extra_body=NO_THINK)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content, "thinking=False answers in content"
    assert r.usage.prompt_tokens == len(engine.chat_prompt([{"role": "user", "content": "Hello"}], None, thinking=False))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_thinking_puts_reasoning_apart(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=12, temperature=0)
    message = r.choices[0].message
    # The demo never closes its reasoning within 12 tokens: all of it is reasoning, none leaks into content.
    assert message.model_extra["reasoning_content"]
    assert "<think>" not in (message.content or "") and "<|" not in message.model_extra["reasoning_content"]


def test_streaming_chunks_add_up_to_the_answer_with_usage(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me of Rome"}], max_tokens=16,
                  temperature=0.8, seed=7)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == (whole.choices[0].message.model_extra["reasoning_content"] or "")
    assert content == (whole.choices[0].message.content or "")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_content_parts_and_history_fields_render_like_strings(client, server, engine):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello.", "reasoning": "greet back"},
             {"role": "user", "content": [{"type": "text", "text": "Again"}]}]
    strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},
               {"role": "user", "content": "Again"}]
    with server.client() as http:
        a = http.post("/tokenize", json={"messages": parts}).json()
        b = http.post("/tokenize", json={"messages": strings}).json()
    assert a["tokens"] == b["tokens"] == engine.chat_prompt(strings, None, thinking=True)
    r = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=4)
    assert r.usage.prompt_tokens == len(a["tokens"])


def test_completions_text_ids_batch_and_stream(client, engine):
    ids = engine.tokenizer.encode("ROMEO:")
    by_text = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=10, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == engine.generate(
        "ROMEO:", max_new_tokens=10, temperature=0).text
    assert by_text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text   # greedy: both samples agree
    streamed = list(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=10, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_text.choices[0].text
    assert streamed[-1].usage.completion_tokens == by_text.usage.completion_tokens


def test_seeded_requests_agree_alone_and_concurrent(client):
    def ask(seed):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}],
                                              max_tokens=10, temperature=1.0, seed=seed).choices[0].message
    alone = ask(3)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, [3, 11, 3, 12, 3, 13]))
    for m in (together[0], together[2], together[4]):
        assert (m.content, m.model_extra["reasoning_content"]) == (alone.content, alone.model_extra["reasoning_content"])


def test_n_choices_are_seed_plus_j(client):
    def ask(seed, n=1):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}],
                                              max_tokens=8, temperature=1.0, seed=seed, n=n)
    r = ask(5, n=3)
    alone = [ask(5 + j) for j in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice, single in zip(r.choices, alone):
        assert choice.message.model_extra["reasoning_content"] == single.choices[0].message.model_extra["reasoning_content"]
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens       # one prompt, counted once
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_disconnect_mid_stream_frees_the_slot(server, engine):
    host = server.state.host
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "prompt": "ROMEO:", "max_tokens": 800, "temperature": 0.8, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert host.slots_taken == 1
    # 800 tokens take ~15 s on a CPU; the abort must free the slot long before that.
    assert wait_until(lambda: host.slots_taken == 0 and not host.streams, timeout=5)
    if hasattr(engine, "num_running"):
        assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
    else:
        assert wait_until(lambda: not host.lock.locked(), timeout=5)


def test_logprobs(client, engine):
    _needs(engine, "generate", "logprobs")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, temperature=0, extra_body=NO_THINK)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)   # greedy took the top one
    c = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4, logprobs=2, temperature=0)
    assert len(c.choices[0].logprobs.tokens) == 4 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize("choice,parallel", [("required", None), ("required", False),
                                             ({"type": "function", "function": {"name": "get_weather"}}, False)])
def test_tool_choice_gives_schema_valid_calls(client, engine, choice, parallel):
    _needs(engine, "chat", "tool_choice")
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}],
                                       tools=[CLOCK, WEATHER], tool_choice=choice, max_tokens=80, temperature=0.7,
                                       seed=1, extra_body=NO_THINK, **extra)
    c = r.choices[0]
    assert c.message.tool_calls
    if parallel is False:      # one call, and the turn ends with it
        assert len(c.message.tool_calls) == 1 and c.finish_reason == "tool_calls"
    else:                      # the demo may go on calling until max_tokens: complete calls only, either way
        assert c.finish_reason in ("tool_calls", "length")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (CLOCK, WEATHER)}
    for i, call in enumerate(c.message.tool_calls):
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        assert call.id == f"functions.{call.function.name}:{i}"       # Kimi's ids, as the model wrote them
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_call_stream_order_and_results_fed_back(client, engine):
    _needs(engine, "chat", "tool_choice")
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    kwargs = dict(model=MODEL, tools=[WEATHER], max_tokens=80, temperature=0.7, seed=2, extra_body=NO_THINK)
    chunks = list(client.chat.completions.create(messages=messages, tool_choice="required", stream=True,
                                                 parallel_tool_calls=False, **kwargs))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id.startswith("functions.get_weather:")
    assert deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The call and its result go back as history; the next turn answers in text.
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": deltas[0].id, "content": '{"sky": "sunny"}'}]
    r = client.chat.completions.create(messages=messages, tool_choice="none", **kwargs)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    rendered = engine.tokenizer.decode(engine.chat_prompt(messages, [WEATHER], thinking=False))
    assert "## Return of " + deltas[0].id in rendered and r.usage.prompt_tokens == len(
        engine.chat_prompt(messages, [WEATHER], thinking=False))


def test_response_format_json_schema(client, engine):
    _needs(engine, "chat", "response_format")
    # Bounded strings: the demo model would otherwise write Shakespeare inside the string until max_tokens.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A person, as JSON"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
                                       max_tokens=60, temperature=0.7, seed=0, extra_body=NO_THINK)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_multi_turn_reuses_the_cached_prefix(client, engine):
    if not hasattr(engine.stats, "cached_tokens"):
        pytest.skip("this engine has no prefix cache yet")
    history = [{"role": "system", "content": "You speak as a Shakespearean herald. " * 20},
               {"role": "user", "content": "Announce the king."}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0, extra_body=NO_THINK)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the queen?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0, extra_body=NO_THINK)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached < second.usage.prompt_tokens   # whole blocks of the shared prefix


def test_metrics_count_what_was_served(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(server.url + "/metrics").text
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    before = scrape()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, extra_body=NO_THINK)
    after = scrape()

    def grew(name):
        return after[name + "[]"] - before.get(name + "[]", 0)
    assert grew("kimi_engine_prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("kimi_engine_prompt_tokens_cached_total") == r.usage.prompt_tokens_details.cached_tokens
    assert grew("kimi_engine_generation_tokens_total") == r.usage.completion_tokens
    assert grew("kimi_engine_time_to_first_token_seconds_count") == 1
    assert grew("kimi_engine_time_per_output_token_seconds_count") == (1 if r.usage.completion_tokens > 1 else 0)
    assert after["kimi_engine_requests_running[]"] == 0 and after["kimi_engine_requests_waiting[]"] == 0
    key = "kimi_engine_requests_total[('endpoint', '/v1/chat/completions'), ('status', '200')]"
    assert after[key] - before.get(key, 0) == 1
