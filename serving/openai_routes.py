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
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from flashops.model.tokenizer import END_THINK as THINK_END
from flashops.model.tokenizer import THINK as THINK_START
from flashops.serving.predictor import FlashPredictor
from flashops.serving.logprobs import chat_logprobs, completion_logprobs
from flashops.serving.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                       ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionChoice,
                                       CompletionRequest, Delta, ErrorResponse, ModelCard, ModelList, OpenAIError,
                                       Usage, new_id, refuse_unsupported_fields, validation_error)
from flashops.serving.sampling import SamplingParams

PREFIX = "/openai/v1"


_ERRORS = {code: {"model": ErrorResponse, "description": desc} for code, desc in [
    (400, "invalid request: the message names the field"), (404, "no such model or route"),
    (405, "method not allowed"), (429, "overloaded: retry after the Retry-After header's seconds"),
    (500, "generation failed")]}


def _body(model: type[BaseModel]) -> dict:
    """The request body as the OpenAPI document shows it. The routes parse bodies themselves (to answer
    with OpenAI error bodies and to tell unsupported OpenAI fields from typos), so FastAPI cannot infer it."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def mount_openai(app: FastAPI, models: dict[str, FlashPredictor]) -> None:
    routes = _Routes(models)
    router = APIRouter(prefix=PREFIX, tags=["openai"])
    router.add_api_route("/models", routes.list_models, methods=["GET"], response_model=ModelList,
                         responses=_ERRORS)
    router.add_api_route("/models/{model_id:path}", routes.retrieve_model, methods=["GET"], response_model=ModelCard,
                         responses=_ERRORS)
    router.add_api_route("/completions", routes.completions, methods=["POST"], responses=_ERRORS,
                         openapi_extra=_body(CompletionRequest))
    router.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"], responses=_ERRORS,
                         openapi_extra=_body(ChatCompletionRequest))
    app.include_router(router)
    app.add_exception_handler(OpenAIError, _error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    _document_request_bodies(app, [CompletionRequest, ChatCompletionRequest])


def _document_request_bodies(app: FastAPI, bodies: list[type[BaseModel]]) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            _, defs = models_json_schema([(m, "validation") for m in bodies],
                                         ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


async def _error_response(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Under /openai/v1 a 404 or 405 from routing is an OpenAI error body too (clients read error.message);
    elsewhere (KServe v1/v2) FastAPI's usual {"detail": ...}."""
    if request.url.path == PREFIX or request.url.path.startswith(PREFIX + "/"):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}: see GET {PREFIX}/models, POST {PREFIX}/completions and "
                        f"{PREFIX}/chat/completions",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(OpenAIError(exc.status_code, message, code=kind).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
    return await http_exception_handler(request, exc)


class _Routes:
    def __init__(self, models: dict[str, FlashPredictor]):
        self.models = models

    async def list_models(self) -> dict:
        return ModelList(data=[self._card(name) for name in self.models]).model_dump()

    async def retrieve_model(self, model_id: str) -> dict:
        """One served model (the openai client's `models.retrieve`)."""
        self._predictor(model_id)
        return self._card(model_id).model_dump()

    def _card(self, name: str) -> ModelCard:
        m = self.models[name]
        return ModelCard(id=name, created=m.created, max_model_len=m.engine.max_len)

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
        logprobs = None
        if req.top_logprobs_wanted is not None:
            logprobs = completion_logprobs(await predictor.score(ids, gen.token_ids, req.top_logprobs_wanted),
                                           predictor.codec.decode)
        return Completion(model=req.model, choices=[CompletionChoice(text=gen.text, finish_reason=gen.finish_reason,
                                                                     logprobs=logprobs)],
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
        reasoning, content = split_reasoning(gen.text, thinking)
        message = AssistantMessage(content=content, reasoning_content=reasoning if thinking else None)
        logprobs = None
        if req.top_logprobs_wanted is not None:
            logprobs = chat_logprobs(await predictor.score(ids, gen.token_ids, req.top_logprobs_wanted),
                                     predictor.codec.decode)
        return ChatCompletion(model=req.model, choices=[ChatChoice(message=message, finish_reason=gen.finish_reason,
                                                                   logprobs=logprobs)],
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
        req = model.model_validate(refuse_unsupported_fields(data))
    except ValidationError as e:
        raise validation_error(e) from None
    if req.stream and req.top_logprobs_wanted is not None:
        raise OpenAIError(400, "logprobs: not supported by this server together with stream: true; ask without "
                               "streaming", param="logprobs", code="unsupported_parameter")
    return req


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


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """(reasoning, answer) of a whole generation, as the chat route returns them (reasoning_content, content);
    `flashops eval` compares the same answer."""
    return _ReasoningSplitter(thinking).feed(text, final=True)


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
