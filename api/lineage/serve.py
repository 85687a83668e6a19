"""Start the lineage HTTP API with uvicorn (what `flashops lineage serve` runs).

    python -m flashops.api.lineage.serve --db sqlite:////tmp/lineage.db --port 8080
    FLASHOPS_LINEAGE_TOKENS="reader:read,writer:read+write" flashops lineage serve --db postgresql+psycopg://...
"""
from __future__ import annotations

import secrets
import socket
import threading
import time
from dataclasses import dataclass

from flashops.api.lineage.auth import SCOPES, Tokens, load_tokens


@dataclass
class Server:
    """A running server (in a thread): .url, .tokens, .store; .stop()."""

    url: str
    tokens: Tokens
    store: object
    _uvicorn: object
    _thread: threading.Thread

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.store.close()


def build(db: str | None, tokens: Tokens | None = None):
    """(app, store, tokens). With no token configured anywhere, one read+write token is generated
    (the caller prints it): the API never runs open."""
    from flashops.api.lineage.app import create_app
    from flashops.api.lineage.store import SqlLineage

    tokens = load_tokens() if tokens is None else tokens
    if not tokens:
        tokens = {secrets.token_urlsafe(24): frozenset(SCOPES)}
    store = SqlLineage(db)
    return create_app(store, tokens), store, tokens


def start_in_thread(db: str | None, tokens: Tokens | None = None, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Serve on a free port in a background thread (tests, benchmarks, notebooks)."""
    import uvicorn

    app, store, tokens = build(db, tokens)
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="lineage-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the lineage API did not start on {host}:{port}")
        time.sleep(0.02)
    return Server(f"http://{host}:{port}", tokens, store, server, thread)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(description="the flashops lineage HTTP API")
    p.add_argument("--db", default=None, help="sqlite:///PATH or postgresql+psycopg://...; default SQLite in $FLASHOPS_HOME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args(argv)
    app, _, tokens = build(a.db)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
