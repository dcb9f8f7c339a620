"""The agent loop on a real tiny model: template -> generate -> parse -> tools -> append, the prefix cache
serving each round what earlier rounds ran through the model."""

import json

import pytest
import torch

import kimi_engine as ke
from kimi_engine.runtime.agent import tool_schema

from .model_helpers import write_chat_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_chat_checkpoint(tmp_path_factory.mktemp("agent"))
    return ke.load(path, dtype=torch.float32, progress=False, device="cpu")


def get_weather(city: str, unit: str = "C") -> dict:
    """Current weather for a city.

    Args:
        city: the city's name
        unit: C or F
    """
    if city == "Atlantis":
        raise LookupError("no such city")
    return {"city": city, "sky": "sunny", "temp": 21, "unit": unit}


def call(name, args, index):
    return (f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{json.dumps(args)}"
            "<|tool_call_end|>")


def scripted(engine, rounds: list[str]):
    """A logits processor that makes the (real) model write `rounds[i]` in round i, then <|im_end|>.

    The model still prefills and decodes every token over its cache; only the choice is steered."""
    scripts = iter([engine.tokenizer.encode(text) + [engine.tokenizer.eos_token_id] for text in rounds])
    state = {}

    def force(ids, row):
        if not ids:
            state["script"] = next(scripts)
        out = torch.full_like(row, float("-inf"))
        out[state["script"][len(ids)]] = 0
        return out
    return force


def test_tool_schema_from_signature_and_docstring():
    schema = tool_schema(get_weather)["function"]
    assert schema["name"] == "get_weather" and schema["description"] == "Current weather for a city."
    assert schema["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city's name"},
        "unit": {"type": "string", "description": "C or F"}}}


def test_round_trip_prefills_only_what_is_appended(engine):
    rounds = [
        "<think>I should look it up.</think>" "<|tool_calls_section_begin|>"
        + call("get_weather", {"city": "Paris"}, 0) + call("get_weather", {"city": "Atlantis"}, 1)
        + "<|tool_calls_section_end|>",
        "<think>Paris is sunny; Atlantis failed.</think>It is sunny in Paris, 21 C.",
    ]
    steps = []
    run = engine.run_agent([{"role": "user", "content": "Weather in Paris and Atlantis?"}], [get_weather],
                           on_step=steps.append, logits_processors=[scripted(engine, rounds)], temperature=0)
    assert run.finish_reason == "answer" and len(run.steps) == 2 and steps == run.steps
    assistant, paris, atlantis, answer = run.messages[1:]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["get_weather"] * 2
    assert assistant["reasoning_content"] == "I should look it up."
    assert json.loads(paris["content"])["sky"] == "sunny" and paris["tool_call_id"] == "functions.get_weather:0"
    assert atlantis["content"] == "Error: LookupError: no such city"       # the exception became a result
    assert answer["content"] == "It is sunny in Paris, 21 C." and "tool_calls" not in answer

    # Round 2 is served every full block round 1 ran through the model, prompt and generated tokens alike;
    # it prefills what was appended plus round 1's partly filled last block.
    first, second = run.steps
    block = engine.blocks.block_size
    assert first.cached_tokens == 0 and first.prefilled_tokens == first.prompt_tokens
    fed_in_round_1 = first.prompt_tokens + first.generated_tokens - 1      # the final <|im_end|> was never fed
    assert fed_in_round_1 >= 2 * block                                     # the test reaches past one block
    assert second.cached_tokens == fed_in_round_1 // block * block
    assert second.prefilled_tokens == second.prompt_tokens - second.cached_tokens


def test_max_tool_calls_stops_the_loop(engine):
    looping = ("<think>Once more.</think><|tool_calls_section_begin|>" + call("get_weather", {"city": "Rome"}, 0)
               + "<|tool_calls_section_end|>")
    tool = {**tool_schema(get_weather), "callable": get_weather}          # an OpenAI tool dict with a callable
    run = engine.run_agent([{"role": "user", "content": "Again and again"}], [tool], max_tool_calls=2,
                           logits_processors=[scripted(engine, [looping] * 5)], temperature=0)
    assert run.finish_reason == "max_tool_calls" and len(run.steps) == 3
    assert sum(m["role"] == "tool" for m in run.messages) == 2
    assert all(s.cached_tokens > 0 for s in run.steps[1:])


def test_a_template_that_renders_differently_is_served_only_the_common_prefix(engine):
    # Without a <think></think> block the model's turn differs from the template's rendering of it: the
    # blocks up to the turn still match, the ones the model wrote do not.
    rounds = ["<|tool_calls_section_begin|>" + call("get_weather", {"city": "Oslo"}, 0) + "<|tool_calls_section_end|>",
              "<think></think>Sunny."]
    run = engine.run_agent([{"role": "user", "content": "Oslo?"}], [get_weather],
                           logits_processors=[scripted(engine, rounds)], temperature=0)
    assert run.answer["content"] == "Sunny."
    first, second = run.steps
    block = engine.blocks.block_size
    assert second.cached_tokens <= first.prompt_tokens // block * block   # nothing the model wrote was reused


def test_bad_tools_raise(engine):
    with pytest.raises(ValueError, match="tools"):
        engine.run_agent([{"role": "user", "content": "hi"}], [{"type": "function"}])


def test_chat_splits_reasoning_content_and_tool_calls(engine):
    text = ("<think>Think first.</think>Here: " "<|tool_calls_section_begin|>" + call("get_weather", {"city": "Rome"}, 0)
            + "<|tool_calls_section_end|>")
    messages = [{"role": "user", "content": "Rome?"}]
    message = engine.chat(messages, tools=[tool_schema(get_weather)], logits_processors=[scripted(engine, [text])])
    assert message["reasoning_content"] == "Think first." and message["content"] == "Here: "
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    deltas = list(engine.chat(messages, tools=[tool_schema(get_weather)], stream=True,
                              logits_processors=[scripted(engine, [text])]))
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Think first."
    assert "".join(d.get("content", "") for d in deltas) == "Here: "
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["get_weather"]


def test_chat_without_thinking_starts_in_content(engine):
    message = engine.chat([{"role": "user", "content": "Hi"}], thinking=False,
                          logits_processors=[scripted(engine, ["Hello there."])])
    assert message["content"] == "Hello there." and message["reasoning_content"] == ""


def test_heavy_chat_aggregates_drafts(engine):
    before = engine.stats.prefill_tokens
    message = engine.chat([{"role": "user", "content": "Hi"}], n=4, aggregate=True, max_new_tokens=8, seed=1)
    assert len(message["drafts"]) == 4 and set(message) >= {"content", "reasoning_content", "tool_calls"}
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    # The drafts' prompt once, then the aggregation turn (which quotes the drafts) once.
    assert engine.stats.prefill_tokens - before > len(prompt)
