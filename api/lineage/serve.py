"""Start the lineage HTTP API with uvicorn (what `flashops lineage serve` runs).

    python -m flashops.api.lineage.serve --db sqlite:////tmp/lineage.db --port 8080
    FLASHOPS_LINEAGE_TOKENS="reader:read,writer:read+write" flashops lineage serve --db postgresql+psycopg://...
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
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


def app_from_env():
    """The app of one uvicorn worker process (--workers N): database from FLASHOPS_LINEAGE_DB, tokens as usual."""
    app, _, _ = build(os.environ.get("FLASHOPS_LINEAGE_DB") or None, load_tokens())
    return app


def run(db: str | None, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
        log_level: str = "info", say=print) -> None:
    """Serve in the foreground. With no token configured one read+write token is generated and shown."""
    import uvicorn

    from flashops.api.lineage.store import SqlLineage, default_sqlite_url

    tokens = load_tokens()
    if not tokens:
        token = secrets.token_urlsafe(24)
        os.environ["FLASHOPS_LINEAGE_TOKEN"] = token  # worker processes inherit it
        tokens = load_tokens()
        say(f"no token configured; generated one (read+write):\n  export FLASHOPS_LINEAGE_TOKEN={token}")
    db = db or default_sqlite_url()
    store = SqlLineage(db)  # migrate once, before any worker starts
    say(f"lineage API on http://{host}:{port} (docs: /docs), {workers} worker(s), database {store.engine.url!r}")
    if workers <= 1:
        from flashops.api.lineage.app import create_app

        uvicorn.run(create_app(store, tokens), host=host, port=port, log_level=log_level)
        return
    store.close()
    os.environ["FLASHOPS_LINEAGE_DB"] = db
    uvicorn.run("flashops.api.lineage.serve:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level=log_level)


def open_dashboard(db: str | None, port: int = 8765, open_browser: bool = True, say=print) -> None:
    """`flashops ui`: the dashboard over the local lineage (SQLite in $FLASHOPS_HOME by default) on 127.0.0.1
    only, with a read-only token made for this process; the browser opens already logged in."""
    import webbrowser

    from flashops.api.lineage.store import default_sqlite_url

    token = secrets.token_urlsafe(24)
    server = start_in_thread(db or default_sqlite_url(), {token: frozenset({"read"})}, "127.0.0.1", port)
    url = f"{server.url}/ui/login?token={token}"
    say(f"flashops dashboard on {server.url}/ui over {server.store.engine.url!r} (Ctrl-C stops it)\n"
        f"  open: {url}")
    if open_browser and not webbrowser.open(url):
        say("  (no browser found here: open the link above)")
    try:
        while server._thread.is_alive():
            server._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="the flashops lineage HTTP API")
    p.add_argument("--db", default=None, help="sqlite:///PATH or postgresql+psycopg://...; default SQLite in $FLASHOPS_HOME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    run(a.db, a.host, a.port, a.workers, a.log_level, say=lambda m: print(m, file=sys.stderr))


if __name__ == "__main__":
    main()
