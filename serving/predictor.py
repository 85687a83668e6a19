"""The KServe predictor: a `kserve.Model` that generates text, for the v1, v2 and OpenAI protocols.

v1  POST /v1/models/<name>:predict   {"instances": ["text", {"prompt": "text", "max_tokens": 8}]}
                                     -> {"predictions": [{"text", "finish_reason", "completion_tokens"}]}
v2  POST /v2/models/<name>/infer     input "text_input" (BYTES), request parameters max_tokens/temperature/...
                                     -> output "text_output" (BYTES)
OpenAI routes (openai_routes.py) call `complete` / `stream` below.

All three go through the same request limiter and engine, so the protocols share forward passes.
"""
from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from flashops.serving.engine import Chunk, Engine
from flashops.serving.limiter import RequestLimiter
from flashops.serving.metrics import ModelMetrics
from flashops.serving.protocol import OpenAIError
from flashops.serving.sampling import DEFAULT_MAX_TOKENS, SamplingParams

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")


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
            return SamplingParams(max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, room), temperature=temperature,
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
            parts, n, finish = [], 0, "stop"
            async for chunk in self.stream(ids, params):
                parts.append(chunk.text)
                n += len(chunk.token_ids)
                finish = chunk.finish_reason or finish
        return Generation("".join(parts), finish, len(ids), n)

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
        for i, inst in enumerate(instances):
            if isinstance(inst, str):
                inst = {"prompt": inst}
            if not isinstance(inst, dict) or not isinstance(inst.get("prompt"), str):
                raise InvalidInput(f"instances[{i}]: expected a string or an object with a 'prompt' string")
            unknown = set(inst) - {"prompt", *SAMPLING_FIELDS}
            if unknown:
                raise InvalidInput(f"instances[{i}]: unknown field(s) {sorted(unknown)}; "
                                   f"known: prompt, {', '.join(SAMPLING_FIELDS)}")
            predictions.append(await self._generate_one(inst["prompt"], inst))
        return {"predictions": predictions}

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        text_input = request.get_input_by_name("text_input")
        if text_input is None:
            raise InvalidInput('expected an input named "text_input" with datatype BYTES')
        if text_input.datatype != "BYTES":
            raise InvalidInput(f'input "text_input" has datatype {text_input.datatype}: use BYTES')
        # not InferInput.as_string(): it assumes bytes, but JSON requests carry str
        prompts = [d.decode() if isinstance(d, bytes) else str(d) for d in _flat(text_input.data)]
        params = dict(request.parameters or {})
        unknown = set(params) - set(SAMPLING_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {sorted(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
        results = [await self._generate_one(p, params) for p in prompts]
        return InferResponse(
            response_id=request.id or "", model_name=self.name, infer_outputs=[
                InferOutput(name="text_output", shape=[len(results)], datatype="BYTES",
                            data=[r["text"] for r in results]),
                InferOutput(name="completion_tokens", shape=[len(results)], datatype="INT64",
                            data=[r["completion_tokens"] for r in results]),
            ])

    async def _generate_one(self, prompt: str, options: dict[str, Any]) -> dict[str, Any]:
        stop = options.get("stop") or ()
        stop = [stop] if isinstance(stop, str) else list(stop)
        ids = self.prompt_ids(prompt)
        try:
            params = self.sampling(len(ids), _int(options.get("max_tokens"), "max_tokens"),
                                   float(options.get("temperature", 1.0)), float(options.get("top_p", 1.0)),
                                   _int(options.get("seed"), "seed"), stop)
        except (TypeError, ValueError) as e:
            raise OpenAIError(400, f"bad sampling parameter: {e}") from None
        gen = await self.complete(ids, params)
        return {"text": gen.text, "finish_reason": gen.finish_reason, "completion_tokens": gen.completion_tokens}


def _int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _flat(data: Any) -> list[Any]:
    if isinstance(data, (list, tuple)):
        return [x for item in data for x in _flat(item)]
    return [data]
