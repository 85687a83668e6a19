"""Every lineage test that takes `db_url` runs twice: on SQLite and on the real PostgreSQL."""
import pytest


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def lineage(db_url):
    from flashops.api.lineage import open_lineage

    lin = open_lineage(db_url)
    yield lin
    lin.close()
