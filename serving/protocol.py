"""The OpenAI-compatible wire format: request, response, stream-chunk and error bodies.

Our own pydantic models (kserve's OpenAI types import vllm, which we never install). Requests reject
unknown fields, so a typo (`max_token`) is a 400 naming the field instead of a silently ignored knob, and
use strict types (`max_tokens: true` and `thinking: "yes"` are refused, not coerced). Real OpenAI fields we
do not implement (`n`, `echo`, `logit_bias`, ...) are accepted only at their neutral value; any other value
is a 400 saying "not supported by this server". `logprobs` / `top_logprobs` are implemented (logprobs.py).

    curl -s 127.0.0.1:8080/openai/v1/chat/completions -d '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20

# Real OpenAI request fields this server does not implement, with the value that means "off". A client may
# send the neutral value (many SDKs send n=1, presence_penalty=0); anything else is refused as "not
# supported by this server", never as a misspelling.
UNSUPPORTED_OPENAI_FIELDS: dict[str, Any] = {
    "n": 1, "best_of": 1, "echo": False, "suffix": None, "logit_bias": {}, "presence_penalty": 0,
    "frequency_penalty": 0, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
    "functions": [], "function_call": "none", "parallel_tool_calls": None, "service_tier": "auto", "store": False,
    "metadata": {}, "modalities": ["text"], "audio": None, "prediction": None, "reasoning_effort": None,
    "web_search_options": None,
}


class SamplingOptions(BaseModel):
    """How to sample, shared by every protocol (OpenAI bodies, KServe v1 instances, v2 parameters). Strict
    types: `max_tokens: true` or `"8"` is refused, not read as 1 or 8."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int | None = Field(None, ge=1, description="new tokens at most; default 256 (or what fits)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="makes sampling reproducible (int64)")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} non-empty stop strings")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"must be a string or a list of up to {MAX_STOP_SEQUENCES} strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return list(stops)


class _Request(SamplingOptions):
    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; k: each token's logprob plus the k most likely alternatives."""
        raise NotImplementedError


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(description="text, or token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                 description="the sampled tokens' log-probabilities and this many alternatives")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    thinking: bool | None = Field(None, description="reasoning block before the answer; default from the deployment")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM style: {'thinking': bool}")
    logprobs: bool = Field(False, description="return each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: this many most likely alternatives per token")

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _merge(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: list[TokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def refuse_unsupported_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The body without the real OpenAI fields sent at their neutral value; a real OpenAI field at any other
    value is a 400 saying this server does not support it (not "check the spelling")."""
    out = dict(data)
    for field, neutral in UNSUPPORTED_OPENAI_FIELDS.items():
        if field not in out:
            continue
        value = out.pop(field)
        if value is None or (isinstance(value, bool) == isinstance(neutral, bool) and value == neutral):
            continue
        shown = repr(value)[:80]
        raise OpenAIError(400, f"{field}: not supported by this server (an OpenAI field flashops does not implement); "
                               f"got {shown}: leave it out" + (f" or send {neutral!r}" if neutral not in (None, {}, [])
                                                               else ""),
                          param=field, code="unsupported_parameter")
    return out


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def _field_path(loc: tuple) -> str:
    """("stop", "list[str]", 0) -> "stop.0": drop pydantic's union-member and validator tags."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        "[" in p or p in _TYPE_TAGS or p.startswith(("function-", "lax-", "strict-"))))]
    return ".".join(parts) or "body"


def validation_error(exc: Any) -> OpenAIError:
    """A pydantic ValidationError -> one 400 naming the field, the value and what is allowed."""
    errors = exc.errors()
    first = errors[0]
    field = _field_path(tuple(first["loc"]))
    value = first.get("input")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field: check the spelling (OpenAI names such as max_tokens, temperature, top_p, stop, seed)"
    fields = {_field_path(tuple(e["loc"])) for e in errors}
    more = f" (and {len(fields) - 1} more problem(s))" if len(fields) > 1 else ""
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    return OpenAIError(400, f"{field}: {msg}; got {shown[:200]}{more}", param=field, code="invalid_value")
