"""Lineage fixtures. `lineage` runs each contract test three ways: direct SQL on SQLite, direct SQL on the
real PostgreSQL, and the HTTP client against a real uvicorn server (PostgreSQL behind it)."""
import pytest

from lineage._graph import TOKENS, WRITER


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def lineage_server(postgres_url):
    """A real uvicorn server on 127.0.0.1 over a fresh PostgreSQL schema; tokens READER and WRITER."""
    from flashops.api.lineage.serve import start_in_thread

    server = start_in_thread(postgres_url, TOKENS)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres", "http"])
def lineage(request, tmp_path):
    from flashops.api.lineage import open_lineage

    if request.param == "http":
        server = request.getfixturevalue("lineage_server")
        lin = open_lineage(server.url, token=WRITER)
        lin.engine = server.store.engine  # lets a test count rows behind the API
    else:
        url = f"sqlite:///{tmp_path / 'lineage.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
        lin = open_lineage(url)
    yield lin
    lin.close()
