"""The served app: kserve's protocol routes (v1, v2, health, /metrics) plus our OpenAI routes, and the
process that runs it. Tests drive `create_app` through httpx's ASGI transport; `run` serves it over TCP.

    python -m flashops.serving --model file:///home/me/.flashops/store/models/chat/v1 --mtp-tokens 3
"""
from __future__ import annotations

import asyncio
import logging
import socket

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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before the model loads, so a port in use or out of range is a
    clear error at once (OSError / ValueError) rather than a uvicorn log line after the load."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is 1..65535 (e.g. --port 8080)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like uvicorn: a TIME_WAIT port is free
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def run(predictors: list[FlashPredictor], host: str = "127.0.0.1", port: int = 8080,
        sock: socket.socket | None = None) -> None:
    app = create_app(predictors)
    log.info("serving %s on http://%s:%d (OpenAI routes under /openai/v1)",
             ", ".join(p.name for p in predictors), host, port)
    asyncio.run(serve(app, host, port, sock))
