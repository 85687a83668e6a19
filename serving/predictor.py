"""The KServe predictor: a `kserve.Model` that generates text, for the v1, v2 and OpenAI protocols.

v1  POST /v1/models/<name>:predict   {"instances": ["text", {"prompt": "text", "max_tokens": 8}]}
                                     -> {"predictions": [{"text", "finish_reason", "completion_tokens"}]}
v2  POST /v2/models/<name>/infer     input "text_input" (BYTES), request parameters max_tokens/temperature/...
                                     -> output "text_output" (BYTES)
OpenAI routes (openai_routes.py) call `complete` / `stream` below.

All three go through the same request limiter and engine, so the protocols share forward passes.
"""
from __future__ import annotations

import math
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from flashops.serving.engine import Chunk, Engine
from flashops.serving.limiter import RequestLimiter
from flashops.serving.logprobs import TokenScore, token_scores
from flashops.serving.metrics import ModelMetrics
from flashops.serving.protocol import OpenAIError, SamplingOptions, validation_error
from pydantic import ValidationError

from flashops.serving.sampling import DEFAULT_MAX_TOKENS, SamplingParams

SAMPLING_FIELDS = tuple(SamplingOptions.model_fields)


class TextCodec(Protocol):
    """The tokenizer side the predictor needs (serving/loading.py adapts flashops.model.tokenizer)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def chat_prompt(self, messages: list[dict[str, str]], thinking: bool) -> str: ...


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class FlashPredictor(Model):
    """One served model. `engine`, `codec` and `limiter` are built by serving/loading.py."""

    def __init__(self, name: str, engine: Engine, codec: TextCodec, limiter: RequestLimiter,
                 thinking_default: bool = False, metrics: ModelMetrics | None = None):
        super().__init__(name)
        self.engine, self.codec, self.limiter = engine, codec, limiter
        self.thinking_default = thinking_default
        self.metrics = metrics or engine.metrics
        self.created = int(time.time())
        self.ready = True  # weights are loaded before the predictor is built

    def load(self) -> bool:
        self.ready = True
        return True

    # ------------------------------------------------------------------ shared by every protocol
    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.codec.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise OpenAIError(400, "the prompt is empty: send at least one character or token id",
                              param="prompt")
        vocab = self.engine.backend.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise OpenAIError(400, f"prompt token ids must be within [0, {vocab})", param="prompt")
        if len(ids) >= self.engine.max_len:
            raise OpenAIError(
                400, f"prompt has {len(ids)} tokens but the context holds {self.engine.max_len} "
                "(prompt plus at least one new token): shorten the prompt",
                param="prompt" if isinstance(prompt, (str, list)) else "messages", code="context_length_exceeded")
        return ids

    def sampling(self, n_prompt: int, max_tokens: int | None, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | tuple[str, ...] = ()) -> SamplingParams:
        room = self.engine.max_len - n_prompt
        if max_tokens is not None and max_tokens > room:
            raise OpenAIError(
                400, f"max_tokens={max_tokens} plus the prompt ({n_prompt} tokens) exceeds the context "
                f"({self.engine.max_len}): use max_tokens <= {room}", param="max_tokens",
                code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=min(DEFAULT_MAX_TOKENS, room) if max_tokens is None else max_tokens,
                                  temperature=temperature,
                                  top_p=top_p, seed=seed, stop=tuple(stop or ()))
        except ValueError as e:
            raise OpenAIError(400, str(e)) from None

    async def stream(self, ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Chunks of one generation. The caller holds a limiter slot."""
        self.metrics.prompt(len(ids))
        async with aclosing(self.engine.generate(ids, params)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def complete(self, ids: list[int], params: SamplingParams) -> Generation:
        async with self.limiter.slot():
            parts, tokens, finish = [], [], "stop"
            async for chunk in self.stream(ids, params):
                parts.append(chunk.text)
                tokens.extend(chunk.token_ids)
                finish = chunk.finish_reason or finish
        return Generation("".join(parts), finish, len(ids), len(tokens), tokens)

    async def score(self, ids: list[int], generated: list[int], top: int) -> list[TokenScore]:
        """The generated tokens' log-probabilities (and `top` alternatives each) under the served model."""
        model = self.engine.backend.model
        return await self.engine.run_in_model_thread(lambda: token_scores(model, ids, generated, top))

    # ------------------------------------------------------------------ KServe v1 / v2
    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        try:
            if isinstance(payload, InferRequest):
                return await self._predict_v2(payload)
            return await self._predict_v1(payload)
        except OpenAIError as e:
            if e.status == 429:
                raise
            raise InvalidInput(e.message) from None

    async def _predict_v1(self, payload: dict) -> dict:
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('expected {"instances": ["prompt", {"prompt": "...", "max_tokens": 16}, ...]}')
        predictions = []
        requests = []
        for i, inst in enumerate(instances):  # every instance is checked before any is generated
            if isinstance(inst, str):
                inst = {"prompt": inst}
            if not isinstance(inst, dict) or not isinstance(inst.get("prompt"), str):
                raise InvalidInput(f"instances[{i}]: expected a string or an object with a 'prompt' string")
            unknown = set(inst) - {"prompt", *SAMPLING_FIELDS}
            if unknown:
                raise InvalidInput(f"instances[{i}]: unknown field(s) {sorted(unknown)}; "
                                   f"known: prompt, {', '.join(SAMPLING_FIELDS)}")
            options = {k: v for k, v in inst.items() if k != "prompt"}
            requests.append(self._request(inst["prompt"], options, f"instances[{i}].prompt", f"instances[{i}]."))
        return {"predictions": [await self._generate(ids, params) for ids, params in requests]}

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        names = [i.name for i in request.inputs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise InvalidInput(f"inputs: {', '.join(repr(n) for n in duplicated)} given more than once: send each "
                               "input once")
        unknown = sorted(set(names) - {"text_input"})
        if unknown:
            raise InvalidInput(f"inputs: unknown input(s) {unknown}: this model takes one input, text_input (BYTES)")
        text_input = request.get_input_by_name("text_input")
        if text_input is None:
            raise InvalidInput('expected an input named "text_input" with datatype BYTES')
        if text_input.datatype != "BYTES":
            raise InvalidInput(f'inputs.text_input.datatype: {text_input.datatype}: use BYTES')
        data = _flat(text_input.data)
        shape = list(text_input.shape or [])
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape) or math.prod(shape) != len(data):
            raise InvalidInput(f"inputs.text_input.shape: {shape} does not match its data ({len(data)} element(s)): "
                               f"use shape [{len(data)}]")
        if not all(isinstance(d, (str, bytes)) for d in data):
            raise InvalidInput("inputs.text_input.data: every element must be a string (BYTES)")
        # not InferInput.as_string(): it assumes bytes, but JSON requests carry str
        prompts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in data]
        params = dict(request.parameters or {})
        unknown = set(params) - set(SAMPLING_FIELDS)
        if unknown:
            raise InvalidInput(f"parameters: unknown parameter(s) {sorted(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
        requests = [self._request(p, params, f"inputs.text_input.data[{i}]", "parameters.")
                    for i, p in enumerate(prompts)]
        results = [await self._generate(ids, sampling) for ids, sampling in requests]
        return InferResponse(
            response_id=request.id or "", model_name=self.name, infer_outputs=[
                InferOutput(name="text_output", shape=[len(results)], datatype="BYTES",
                            data=[r["text"] for r in results]),
                InferOutput(name="completion_tokens", shape=[len(results)], datatype="INT64",
                            data=[r["completion_tokens"] for r in results]),
            ])

    def _request(self, prompt: str, options: dict[str, Any], prompt_field: str,
                 options_prefix: str) -> tuple[list[int], SamplingParams]:
        """A KServe prompt and its options, checked with the same strict types as the OpenAI routes; every
        error names the field as the request spells it (instances[0].max_tokens, parameters.stop, ...)."""
        try:
            opts = SamplingOptions.model_validate(options)
        except ValidationError as e:
            err = validation_error(e)
            raise OpenAIError(400, f"{options_prefix}{err.message}", param=f"{options_prefix}{err.param}") from None
        try:
            ids = self.prompt_ids(prompt)
        except OpenAIError as e:
            raise OpenAIError(e.status, f"{prompt_field}: {e.message}", param=prompt_field) from None
        return ids, self.sampling(len(ids), opts.max_tokens, opts.temperature, opts.top_p, opts.seed, opts.stop)

    async def _generate(self, ids: list[int], params: SamplingParams) -> dict[str, Any]:
        gen = await self.complete(ids, params)
        return {"text": gen.text, "finish_reason": gen.finish_reason, "completion_tokens": gen.completion_tokens}


def _flat(data: Any) -> list[Any]:
    if isinstance(data, (list, tuple)):
        return [x for item in data for x in _flat(item)]
    return [data]
