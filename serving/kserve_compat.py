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
4. model_version. kserve's v2 routes document a `model_version` parameter and then answer it with
   NotImplementedError -> 501, a server error for a request the client can fix. We answer 400 naming
   the parameter (schemathesis in tests/serving/test_fuzz.py found it). Goes when kserve supports versions
   or stops documenting them.
5. No model repository API. kserve's /v2/repository/models/{name}/load|unload let any client unload a
   served model, and answer a load of an unknown name with 503 "not ready" (a retry hint for a request that
   can never succeed; schemathesis found it). flashops loads its models at startup, once: routes registered
   before kserve's (the first match wins) answer 404 saying so. Goes if flashops ever loads models on demand.
"""
from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI
from fastapi.responses import ORJSONResponse


REPOSITORY_PREFIX = "/v2/repository"


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
    for action in ("load", "unload"):  # workaround 5, before kserve's routes so these match first
        app.add_api_route(f"{REPOSITORY_PREFIX}/models/{{model_name}}/{action}", _no_repository, methods=["POST"],
                          include_in_schema=False)
    rest._register_endpoints(app)
    rest._add_exception_handlers(app)
    app.add_exception_handler(NotImplementedError, _version_not_supported)
    app.state.kserve_server = server
    return app


async def _no_repository(model_name: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"the model repository API is not served: flashops loads its models at startup "
                                  f"({model_name!r} cannot be loaded or unloaded at runtime)"}, status_code=404)


async def _version_not_supported(request: Any, exc: NotImplementedError) -> Any:
    """Workaround 4: a model_version kserve cannot serve is the client's to drop (400), not a 501."""
    from fastapi.responses import JSONResponse
    from kserve.errors import not_implemented_error_handler

    if request.query_params.get("model_version") is not None or "/versions/" in request.url.path:
        return JSONResponse({"error": f"model_version: {exc} This server serves one version per model: leave "
                                      "model_version out"}, status_code=400)
    return await not_implemented_error_handler(request, exc)


async def serve(app: FastAPI, host: str, port: int, sock: Any = None) -> None:
    """Run the app with uvicorn on host:port (or on `sock`, already bound) until cancelled or signalled."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve(sockets=[sock] if sock is not None else None)
