"""The served app: kserve's protocol routes (v1, v2, health, /metrics) plus our OpenAI routes, and the
process that runs it. Tests drive `create_app` through httpx's ASGI transport; `run` serves it over TCP.

    python -m flashops.serving --model file:///home/me/.flashops/store/models/chat/v1 --mtp-tokens 3
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI

from flashops.serving.kserve_compat import build_app, serve
from flashops.serving.openai_routes import mount_openai
from flashops.serving.predictor import FlashPredictor

log = logging.getLogger("flashops.serving")


def create_app(predictors: list[FlashPredictor]) -> FastAPI:
    app = build_app(predictors)
    mount_openai(app, {p.name: p for p in predictors})

    @app.on_event("shutdown")
    async def _stop_engines() -> None:
        for p in predictors:
            await p.engine.aclose()

    return app


def run(predictors: list[FlashPredictor], host: str = "127.0.0.1", port: int = 8080) -> None:
    app = create_app(predictors)
    log.info("serving %s on http://%s:%d (OpenAI routes under /openai/v1)",
             ", ".join(p.name for p in predictors), host, port)
    asyncio.run(serve(app, host, port))
