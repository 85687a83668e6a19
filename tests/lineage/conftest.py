"""Lineage fixtures. `lineage` runs each contract test three ways: direct SQL on SQLite, direct SQL on the
real PostgreSQL, and the HTTP client against a real uvicorn server (PostgreSQL behind it).

Migrating a schema costs about a second on a busy machine, so each backend is migrated once per session
and emptied between tests (TRUNCATE ... RESTART IDENTITY; SQLite: a copy of a migrated file). The
migration tests themselves use `db_url`, a fresh unmigrated database every time."""
import shutil

import pytest
from sqlalchemy import text

from lineage._graph import TOKENS, WRITER

TABLES = "evaluations, run_metrics, edges, deployments, models, checkpoints, runs, datasets, nodes"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("postgres_url")


def _empty(engine) -> None:
    with engine.begin() as c:
        c.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def _pg_store(postgres_server):
    from flashops.api.lineage.store import SqlLineage

    schema = postgres_server.new_schema()
    store = SqlLineage(postgres_server.url(schema))
    yield store
    store.close()
    postgres_server.drop_schema(schema)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory):
    from flashops.api.lineage.store import SqlLineage

    path = tmp_path_factory.mktemp("lineage-template") / "lineage.db"
    SqlLineage(f"sqlite:///{path}").close()
    return path


@pytest.fixture(scope="session")
def _server(postgres_server):
    from flashops.api.lineage.serve import start_in_thread

    schema = postgres_server.new_schema()
    server = start_in_thread(postgres_server.url(schema), TOKENS)
    yield server
    server.stop()
    postgres_server.drop_schema(schema)


@pytest.fixture
def lineage_server(_server):
    """A real uvicorn server on 127.0.0.1 over an emptied PostgreSQL schema; tokens READER and WRITER."""
    _empty(_server.store.engine)
    return _server


@pytest.fixture(params=["sqlite", "postgres", "http"])
def lineage(request, tmp_path):
    from flashops.api.lineage import open_lineage

    if request.param == "http":
        server = request.getfixturevalue("lineage_server")
        lin = open_lineage(server.url, token=WRITER)
        lin.engine = server.store.engine  # lets a test count rows behind the API
        yield lin
        lin.close()
    elif request.param == "postgres":
        store = request.getfixturevalue("_pg_store")
        _empty(store.engine)
        yield store
    else:
        path = tmp_path / "lineage.db"
        shutil.copy(request.getfixturevalue("_sqlite_template"), path)
        lin = open_lineage(f"sqlite:///{path}")
        yield lin
        lin.close()
