"""Request bodies, as pydantic models: OpenAI's chat and completions fields, plus vLLM's usual extensions
(top_k, min_p, repetition_penalty, chat_template_kwargs) and /tokenize, /detokenize.

Ranges follow OpenAI's API reference; what the engine itself limits (n against max_batch_size, the
prompt against the context) is checked in the routes, which know the engine. Unknown fields are
ignored, as OpenAI-compatible servers do: clients send ones that do not concern generation (store,
metadata, user, service_tier). Known fields the engine cannot honour are refused, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ApiError

_Lenient = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    model_config = _Lenient
    type: Literal["text"]
    text: str


# Images and audio are refused by the discriminator: the model reads text only.
Content = Union[str, list[TextPart]]


def text_of(content: Content | None) -> str | None:
    """A message's content as one string (the template concatenates text parts the same way)."""
    if content is None or isinstance(content, str):
        return content
    return "".join(p.text for p in content)


class FunctionCall(BaseModel):
    model_config = _Lenient
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = _Lenient
    id: str                                   # Kimi's functions.NAME:IDX, sent back as the model wrote it
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(BaseModel):
    model_config = _Lenient
    role: Literal["system", "developer"]      # developer: OpenAI's newer name for system
    content: Content
    name: str | None = None


class UserMessage(BaseModel):
    model_config = _Lenient
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(BaseModel):
    model_config = _Lenient
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None              # vLLM's newer name for reasoning_content
    name: str | None = None


class ToolMessage(BaseModel):
    model_config = _Lenient
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class FunctionDef(BaseModel):
    model_config = _Lenient
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _Lenient
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = _Lenient
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = _Lenient
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    """The only template switch Kimi's template has: thinking=False answers without a reasoning block."""
    model_config = ConfigDict(extra="forbid")
    thinking: bool = True


class Sampling(BaseModel):
    """Fields both endpoints share. None: the checkpoint's generation_config default."""
    model_config = _Lenient
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)          # -1 or 0: off (vLLM spells it -1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    # The engine has no presence/frequency penalties: accepted only when they change nothing.
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _nonempty(cls, stop):
        if any(not s for s in ([stop] if isinstance(stop, str) else stop or [])):
            raise ValueError("stop strings must be non-empty")
        return stop

    def check(self) -> None:
        """Rules across fields (pydantic would report them without naming the field): ApiError 400."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name}: not supported by this engine (use repetition_penalty)", name)

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise ApiError(400, "response_format: type 'json_schema' needs json_schema.schema", "response_format")


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise ApiError(400, "echo: not supported", "echo")
        if self.suffix:
            raise ApiError(400, "suffix: not supported (the model has no fill-in-the-middle)", "suffix")


class TokenizeRequest(BaseModel):
    """Either prompt text, or chat messages rendered as /v1/chat/completions would render them."""
    model_config = _Lenient
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", "prompt")


class DetokenizeRequest(BaseModel):
    model_config = _Lenient
    model: str | None = None
    tokens: list[int]
