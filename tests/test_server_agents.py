"""The OpenAI Agents SDK drives kimi-engine serve: an Agent with a function tool runs to a final output.

The demo model never decides to call a tool by itself, so the first turn forces one with
ModelSettings(tool_choice="required") (constrained decoding makes the call schema-valid); the SDK then
resets tool_choice to "auto" (Agent.reset_tool_choice, its default), feeds the tool's result back, and
the model answers in text: a final output. Seeded and without thinking, so the run is deterministic.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Literal

import pytest

from tests.server_helpers import MODEL, demo_engine, running_server

agents = pytest.importorskip("agents")
openai = pytest.importorskip("openai")


def test_agent_with_a_function_tool_runs_to_a_final_output():
    engine = demo_engine()
    if "tool_choice" not in inspect.signature(engine.chat).parameters or \
            importlib.util.find_spec("kimi_engine.runtime.grammar") is None:
        pytest.skip("engine.chat has no tool_choice yet (constrained decoding)")
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, ToolCallItem, ToolCallOutputItem,
                        function_tool, set_tracing_disabled)
    set_tracing_disabled(True)    # the SDK would otherwise try to upload traces
    cities = []

    @function_tool
    def get_weather(city: Literal["Verona", "Mantua", "Padua"]) -> str:   # an enum: the demo cannot ramble in it
        """Current weather for a city."""
        cities.append(city)
        return f"It is sunny in {city}."

    with running_server(engine) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        agent = Agent(name="herald", instructions="Answer briefly.", tools=[get_weather],
                      model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                      model_settings=ModelSettings(tool_choice="required", max_tokens=48, temperature=0.7,
                                                   extra_body={"seed": 0, "chat_template_kwargs": {"thinking": False}}))
        result = Runner.run_sync(agent, "What is the weather in Verona?", max_turns=4)
    assert cities and all(isinstance(c, str) for c in cities)          # the tool ran with schema-valid arguments
    kinds = [type(item) for item in result.new_items]
    assert ToolCallItem in kinds and ToolCallOutputItem in kinds
    assert len(result.raw_responses) >= 2                               # the result went back for another turn
    assert isinstance(result.final_output, str)
    assert result.raw_responses[-1].output[-1].type == "message"       # it ended on an answer, not a call
