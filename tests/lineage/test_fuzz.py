"""Schemathesis fuzzes every operation of the lineage OpenAPI: no input may give a 500, every answer is a
documented status code, errors are problem+json. Bounded (few examples per operation) to stay fast.
The store is the real PostgreSQL, which rejects more than SQLite (NUL characters, non-finite JSON)."""
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from flashops.api.lineage.app import create_app
from flashops.api.lineage.store import SqlLineage

from lineage._graph import TOKENS, WRITER, record_pipeline


@pytest.fixture(scope="module")
def lineage_api(postgres_server):
    schema = postgres_server.new_schema()
    store = SqlLineage(postgres_server.url(schema))
    record_pipeline(store)  # something to find, so queries do not all end in 404
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(store, TOKENS))
    store.close()
    postgres_server.drop_schema(schema)


def test_no_input_gives_a_server_error(lineage_api):
    # Driven by hand rather than with schema.parametrize: its lazy fixture mode does not run on pytest 9.
    headers = {"Authorization": f"Bearer {WRITER}"}
    failures = []
    for result in lineage_api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])  # no shrinking: the first failure is reported as is
        def fuzz(case):
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error, status_code_conformance])
            if response.status_code >= 400:
                content_type = response.headers.get("content-type")
                content_type = content_type[0] if isinstance(content_type, list) else content_type
                assert content_type == "application/problem+json", response.text

        try:
            fuzz()
        except Exception as e:  # collect all operations' failures, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
