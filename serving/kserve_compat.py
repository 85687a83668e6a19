"""Running kserve 0.21 without vllm: the ONE place for the workarounds. Each says why and when it goes.

1. OpenAI routes. kserve's own OpenAI layer (kserve.protocol.rest.openai) imports vllm's protocol
   types, i.e. it needs kserve[llm], which pins another torch. kserve notices the ImportError and
   skips those routes; we mount our own (serving/openai_routes.py, our own pydantic models) on the
   same FastAPI app. Goes when kserve ships its OpenAI types without vllm.
2. A fresh app per server, bound where we say. `RESTServer.create_application` registers the v1/v2
   routes on the module-global `kserve.model_server.app` (a second server in one process - every test
   - would stack duplicate routes), and its uvicorn config hard-codes host 0.0.0.0 while
   `flashops serve` must bind 127.0.0.1 by default. We call RESTServer's own registration steps on a
   new FastAPI app and run uvicorn ourselves. Goes when kserve takes an app and a host.
3. argv. `kserve.model_server` parses sys.argv at import time with abbreviations on, so our
   `--model URI` would be read as kserve's `--model_name`. We import it with argv hidden. Goes when
   kserve stops parsing argv at import.
"""
from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI
from fastapi.responses import ORJSONResponse


def import_model_server() -> Any:
    """`kserve.model_server` imported without it reading our command line."""
    if "kserve.model_server" in sys.modules:
        return sys.modules["kserve.model_server"]
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve.model_server as model_server
    finally:
        sys.argv = argv
    return model_server


def build_app(models: list[Any]) -> FastAPI:
    """A FastAPI app with kserve's v1/v2 protocol, health and /metrics routes for `models`."""
    model_server = import_model_server()
    from kserve.protocol.rest.server import RESTServer

    server = model_server.ModelServer(enable_grpc=False, workers=1)
    for model in models:
        server.register_model(model)
    rest = RESTServer("unused:app", server.dataplane, server.model_repository_extension, http_port=0)
    app = FastAPI(title="flashops predictor", docs_url=None, redoc_url=None, default_response_class=ORJSONResponse)
    rest._add_middlewares(app)
    rest._register_endpoints(app)
    rest._add_exception_handlers(app)
    app.state.kserve_server = server
    return app


async def serve(app: FastAPI, host: str, port: int) -> None:
    """Run the app with uvicorn on host:port until cancelled or signalled."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve()
