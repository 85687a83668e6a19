"""OpenAI-compatible routes under /openai/v1 (kserve's prefix): models, completions, chat/completions,
with server-sent-event streaming. Errors are OpenAI-style bodies: {"error": {"message", "type", "param", "code"}}.

    curl -N 127.0.0.1:8080/openai/v1/chat/completions -H 'content-type: application/json' \
      -d '{"model": "rl-debug-chat", "stream": true, "messages": [{"role": "user", "content": "2+2?"}]}'
"""
from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from flashops.model.tokenizer import END_THINK as THINK_END
from flashops.model.tokenizer import THINK as THINK_START
from flashops.serving.predictor import FlashPredictor
from flashops.serving.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                       ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionChoice,
                                       CompletionRequest, Delta, ModelCard, ModelList, OpenAIError, Usage, new_id,
                                       validation_error)
from flashops.serving.sampling import SamplingParams

PREFIX = "/openai/v1"


def mount_openai(app: FastAPI, models: dict[str, FlashPredictor]) -> None:
    routes = _Routes(models)
    router = APIRouter(prefix=PREFIX)
    router.add_api_route("/models", routes.list_models, methods=["GET"])
    router.add_api_route("/completions", routes.completions, methods=["POST"])
    router.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"])
    app.include_router(router)
    app.add_exception_handler(OpenAIError, _error_response)


async def _error_response(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class _Routes:
    def __init__(self, models: dict[str, FlashPredictor]):
        self.models = models

    async def list_models(self) -> dict:
        cards = [ModelCard(id=name, created=m.created, max_model_len=m.engine.max_len) for name, m in self.models.items()]
        return ModelList(data=cards).model_dump()

    async def completions(self, request: Request):
        req = await _parse(request, CompletionRequest)
        predictor = self._predictor(req.model)
        ids = predictor.prompt_ids(req.prompt)
        params = predictor.sampling(len(ids), req.max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        if req.stream:
            cid, created = new_id("cmpl"), int(time.time())

            def chunk(text: str, finish: str | None) -> dict:
                return Completion(id=cid, created=created, model=req.model, choices=[
                    CompletionChoice(text=text, finish_reason=finish)]).model_dump(exclude={"usage"})

            return await _stream(predictor, "completions", ids, params, chunk, None, req.include_usage_in_stream,
                                 lambda u: {"id": cid, "object": "text_completion", "created": created,
                                            "model": req.model, "choices": [], "usage": u})
        gen = await _complete(predictor, "completions", ids, params)
        return Completion(model=req.model, choices=[CompletionChoice(text=gen.text, finish_reason=gen.finish_reason)],
                          usage=_usage(gen.prompt_tokens, gen.completion_tokens)).model_dump()

    async def chat_completions(self, request: Request):
        req = await _parse(request, ChatCompletionRequest)
        predictor = self._predictor(req.model)
        thinking = predictor.thinking_default if req.thinking is None else req.thinking
        prompt = predictor.codec.chat_prompt([m.model_dump(exclude_none=True) for m in req.messages], thinking)
        ids = predictor.prompt_ids(prompt)
        params = predictor.sampling(len(ids), req.max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        if req.stream:
            cid, created = new_id("chatcmpl"), int(time.time())

            def chunk(delta: Delta, finish: str | None) -> dict:
                return ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[
                    ChatChunkChoice(delta=delta, finish_reason=finish)]).model_dump(exclude={"usage"},
                                                                                     exclude_none=True)

            splitter = _ReasoningSplitter(thinking)

            def text_chunk(text: str, finish: str | None) -> list[dict]:
                reasoning, content = splitter.feed(text, final=finish is not None)
                out = [chunk(Delta(content=content), None)] if content else []
                if reasoning:
                    out.insert(0, {**chunk(Delta(), None), "choices": [
                        {"index": 0, "delta": {"reasoning_content": reasoning}}]})
                if finish:
                    out.append(chunk(Delta(), finish))
                return out

            return await _stream(predictor, "chat/completions", ids, params, text_chunk,
                                 chunk(Delta(role="assistant", content=""), None), req.include_usage_in_stream,
                                 lambda u: {"id": cid, "object": "chat.completion.chunk", "created": created,
                                            "model": req.model, "choices": [], "usage": u})
        gen = await _complete(predictor, "chat/completions", ids, params)
        reasoning, content = _ReasoningSplitter(thinking).feed(gen.text, final=True)
        message = AssistantMessage(content=content, reasoning_content=reasoning if thinking else None)
        return ChatCompletion(model=req.model, choices=[ChatChoice(message=message, finish_reason=gen.finish_reason)],
                              usage=_usage(gen.prompt_tokens, gen.completion_tokens)).model_dump(exclude_none=True)

    def _predictor(self, name: str) -> FlashPredictor:
        if name not in self.models:
            raise OpenAIError(404, f"model '{name}' is not served here; served: {', '.join(sorted(self.models))}",
                              param="model", code="model_not_found")
        return self.models[name]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        data = await request.json()
    except ValueError:
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _complete(predictor: FlashPredictor, route: str, ids: list[int], params: SamplingParams):
    try:
        gen = await predictor.complete(ids, params)
    except OpenAIError as e:
        predictor.metrics.request(route, e.status)
        raise
    except Exception as e:
        predictor.metrics.request(route, 500)
        raise OpenAIError(500, str(e), type="server_error") from None
    predictor.metrics.request(route, 200)
    return gen


class _ReleasingStream(StreamingResponse):
    """Releases the request's limiter slot however the response ends, even if the client left before
    the first byte (when the body iterator never starts and its own `finally` would never run)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _stream(predictor: FlashPredictor, route: str, ids: list[int], params: SamplingParams,
                  make_chunks: Callable[[str, str | None], Any], first: dict | None, include_usage: bool,
                  usage_chunk: Callable[[dict], dict]) -> StreamingResponse:
    await predictor.limiter.acquire()  # 429 here, before any byte is sent
    predictor.metrics.request(route, 200)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            predictor.limiter.release()

    async def events() -> AsyncIterator[str]:
        n = 0
        try:
            if first is not None:
                yield _sse(first)
            async for chunk in predictor.stream(ids, params):
                n += len(chunk.token_ids)
                out = make_chunks(chunk.text, chunk.finish_reason)
                for item in out if isinstance(out, list) else ([out] if chunk.text or chunk.finish_reason else []):
                    yield _sse(item)
            if include_usage:
                yield _sse(usage_chunk(_usage(len(ids), n).model_dump()))
        except Exception as e:  # the status line is gone: report in-band, then end the stream cleanly
            yield _sse(OpenAIError(500, f"generation failed: {e}", type="server_error").body())
        finally:
            release()
        yield "data: [DONE]\n\n"

    return _ReleasingStream(events(), release)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _ReasoningSplitter:
    """Splits generated text into the reasoning block (<think>...</think>) and the answer, incrementally,
    holding back text that might be the start of the closing tag."""

    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self.buffer = ""

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", text
        self.buffer += text
        if THINK_END in self.buffer:
            reasoning, _, content = self.buffer.partition(THINK_END)
            self.in_reasoning, self.buffer = False, ""
            return _strip_start(reasoning), content.lstrip("\n")
        if final:
            reasoning, self.buffer = self.buffer, ""
            return _strip_start(reasoning), ""
        keep = max((n for n in range(1, len(THINK_END)) if self.buffer.endswith(THINK_END[:n])), default=0)
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return _strip_start(out), ""


def _strip_start(text: str) -> str:
    return text.replace(THINK_START, "", 1) if text.lstrip().startswith(THINK_START) else text
