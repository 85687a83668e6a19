"""The OpenAI-compatible wire format: request, response, stream-chunk and error bodies.

Our own pydantic models (kserve's OpenAI types import vllm, which we never install). Requests reject
unknown fields, so a typo (`max_token`) is a 400 naming the field instead of a silently ignored knob.
Fields OpenAI clients commonly send but we do not implement are accepted only at their neutral value.

    curl -s 127.0.0.1:8080/openai/v1/chat/completions -d '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most; default 256")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, description="makes sampling reproducible")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = None
    # Accepted for client compatibility at their neutral value only.
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logprobs: bool | int | None = Field(None, description="not supported: leave unset")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: Any) -> None:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported: leave the field unset")
        return None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(description="text, or token ids")
    echo: bool = Field(False, le=False, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    thinking: bool | None = Field(None, description="reasoning block before the answer; default from the deployment")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM style: {'thinking': bool}")

    @model_validator(mode="after")
    def _merge(self) -> "ChatCompletionRequest":
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        kwargs = dict(self.chat_template_kwargs or {})
        for key in ("thinking", "enable_thinking"):
            if key in kwargs:
                if not isinstance(kwargs[key], bool):
                    raise ValueError(f"chat_template_kwargs.{key} must be true or false, got {kwargs[key]!r}")
                if self.thinking is None:
                    self.thinking = kwargs.pop(key)
                else:
                    kwargs.pop(key)
        if kwargs:
            raise ValueError(f"unsupported chat_template_kwargs {sorted(kwargs)}: only 'thinking' is known")
        return self


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flashops"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class OpenAIError(Exception):
    """Raised anywhere in request handling; rendered as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def validation_error(exc: Any) -> OpenAIError:
    """A pydantic ValidationError -> one 400 naming the field, the value and what is allowed."""
    errors = exc.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    value = first.get("input")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field: check the spelling (OpenAI names such as max_tokens, temperature, top_p, stop, seed)"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    return OpenAIError(400, f"{field}: {msg}; got {shown[:200]}{more}", param=field, code="invalid_value")
