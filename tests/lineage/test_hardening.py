"""What real clients found in the lineage API (issue 17, items 9-13): Unicode digits, byte-length limits
and which database errors are worth a retry, /metrics, forward-only run status, and an OpenAPI document
that says exactly what the server accepts."""
import asyncio

import httpx
import pytest
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from flashops.api.lineage import Conflict, InvalidInput, NotFound, Unavailable, open_lineage
from flashops.api.lineage import validate as V
from flashops.api.lineage.app import create_app
from flashops.api.lineage.errors import DatabaseError
from flashops.api.lineage.store import SqlLineage, database_error

from lineage._graph import SPEC, TOKENS, WRITER

H = {"Authorization": f"Bearer {WRITER}"}


# ---------------------------------------------------------------------- item 9: ASCII digits only

@pytest.mark.parametrize("digits", ["¹", "²", "٤٢", "４２"])  # superscripts, Arabic-Indic, full-width
def test_unicode_digits_are_names_not_ids(digits):
    assert not V.is_id(digits)
    with pytest.raises(InvalidInput, match="is not a lineage id"):
        V.node_id("run_id", digits)


def test_unicode_digits_give_404_or_422_never_500(lineage_server):
    url = lineage_server.url
    assert httpx.get(f"{url}/v1/find", params={"ref": "¹"}, headers=H).status_code == 404
    assert httpx.get(f"{url}/v1/resolve", params={"ref": "²"}, headers=H).status_code == 404
    assert httpx.get(f"{url}/v1/find", params={"ref": "lineage:٤٢"}, headers=H).status_code == 422
    r = httpx.post(f"{url}/v1/events", headers=H, json={"events": [
        {"op": "upsert_dataset", "args": {"uri": "s3://d"}},
        {"op": "finish_run", "args": {"run_id": "$¹", "status": "failed"}}]})
    assert r.status_code == 422 and "'$¹' is not a lineage id" in r.json()["detail"], r.text


# ---------------------------------------------------------------------- item 10: bytes, 422, and what is retried

def test_a_2048_character_uri_of_4_byte_characters_is_422_not_503(lineage_server):
    uri = "s3://b/" + "\U0001F600" * 2041  # 2,048 characters, 8,171 bytes: too big for a PostgreSQL index row
    for path, body in [("/v1/datasets", {"uri": uri}),
                       ("/v1/models", {"uri": uri, "name": "m", "version": "1"})]:
        r = httpx.post(f"{lineage_server.url}{path}", headers=H, json=body)
        assert r.status_code == 422, r.text
        assert "bytes (UTF-8) is too long: at most 2048 bytes" in r.json()["detail"]
    ok = "s3://b/" + "\U0001F600" * 510  # 2,047 bytes: stored as is
    r = httpx.post(f"{lineage_server.url}/v1/datasets", headers=H, json={"uri": ok})
    assert r.status_code == 200, r.text


def _pg_error(postgres_url, sql: str) -> DBAPIError:
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as c:
            c.execute(text(sql))
    except DBAPIError as e:
        return e
    finally:
        engine.dispose()
    raise AssertionError(f"{sql} did not fail")


def test_only_connection_and_timeout_errors_are_worth_a_retry(postgres_url):
    # real errors from the real PostgreSQL, each classified once
    too_big = _pg_error(postgres_url, "CREATE TEMP TABLE t (v text); CREATE INDEX ON t (v); "
                                      "INSERT INTO t SELECT string_agg(md5(i::text), '') FROM generate_series(1, 300) i")
    assert too_big.orig.sqlstate == "54000"  # index row size exceeds the btree maximum
    assert isinstance(database_error(too_big), InvalidInput) and not database_error(too_big).temporary
    assert isinstance(database_error(_pg_error(postgres_url, "SELECT 1/0")), InvalidInput)
    timeout = _pg_error(postgres_url, "SET LOCAL statement_timeout = 50; SELECT pg_sleep(2)")
    assert isinstance(database_error(timeout), Unavailable) and database_error(timeout).temporary
    missing = _pg_error(postgres_url, "SELECT * FROM no_such_table")
    assert isinstance(database_error(missing), DatabaseError) and not database_error(missing).temporary
    down = _pg_error("postgresql+psycopg://postgres@127.0.0.1:9/test?connect_timeout=2", "SELECT 1")
    assert isinstance(database_error(down), Unavailable)


# ---------------------------------------------------------------------- item 11: /metrics

def _samples(body: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_metrics_count_requests_by_route_and_status_latency_and_database_errors(lineage_server, postgres_server):
    url = lineage_server.url
    for _ in range(3):
        httpx.get(f"{url}/v1/nodes/77", headers=H)  # 404
    httpx.get(f"{url}/v1/nodes", headers=H)
    httpx.get(f"{url}/no/such/{'x' * 5}", headers=H)
    r = httpx.get(f"{url}/metrics")  # no token: the ServiceMonitor has none
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    key = (("method", "GET"), ("route", "/v1/nodes/{node_id}"), ("status", "404"))
    assert m[("flashops_lineage_requests_total", key)] >= 3
    assert m[("flashops_lineage_requests_total", (("method", "GET"), ("route", "/v1/nodes"), ("status", "200")))] >= 1
    assert m[("flashops_lineage_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] >= 1
    assert m[("flashops_lineage_request_seconds_count", (("method", "GET"), ("route", "/v1/nodes/{node_id}")))] >= 3

    # a database that is down: every call is 503 and counted as a database error
    down = SqlLineage("postgresql+psycopg://postgres@127.0.0.1:9/test?connect_timeout=2", migrate_on_open=False)

    async def calls():
        transport = httpx.ASGITransport(app=create_app(down, TOKENS))
        async with httpx.AsyncClient(transport=transport, base_url="http://lineage") as client:
            assert (await client.get("/v1/nodes/1", headers=H)).status_code == 503
            assert (await client.get("/healthz")).status_code == 503
            return _samples((await client.get("/metrics")).text)

    m = asyncio.run(calls())
    assert m[("flashops_lineage_database_errors_total", (("kind", "unavailable"),))] == 2


# ---------------------------------------------------------------------- item 12: status moves forward only

def test_run_status_only_moves_forward(lineage):
    run = lineage.start_run("r", "TrainingRun", "sft", SPEC, "sha256:r")
    lineage.finish_run(run, "running")  # running -> running changes nothing
    lineage.finish_run(run, "failed", {"step": 3})
    lineage.finish_run(run, "succeeded", {"loss": 1.0})  # a resumed attempt of the same run finished it
    finished = lineage.node(run)["node"]["finished_at"]
    lineage.finish_run(run, "succeeded")  # a repeat changes nothing
    assert lineage.node(run)["node"]["finished_at"] == finished
    for backwards in ("failed", "running", "cancelled"):
        with pytest.raises(Conflict, match=f"is already succeeded, so it cannot become {backwards}"):
            lineage.finish_run(run, backwards)
    node = lineage.node(run)["node"]
    assert (node["status"], node["metrics"], node["finished_at"]) == ("succeeded", {"loss": 1.0}, finished)
    cancelled = lineage.start_run("c", "TrainingRun", "sft", SPEC, "sha256:c")
    lineage.finish_run(cancelled, "cancelled")
    with pytest.raises(Conflict, match="only moves forward"):
        lineage.finish_run(cancelled, "succeeded")


def test_a_conflicting_finish_is_409(lineage_server):
    url = lineage_server.url
    run = open_lineage(url, token=WRITER).start_run("r", "TrainingRun", "sft", SPEC, "sha256:r")
    assert httpx.post(f"{url}/v1/runs/{run}/finish", headers=H, json={"status": "succeeded"}).status_code == 200
    r = httpx.post(f"{url}/v1/runs/{run}/finish", headers=H, json={"status": "failed"})
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json", r.text


# ---------------------------------------------------------------------- item 13: the document says what is accepted

def _validator(doc: dict, path: str) -> Draft202012Validator:
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**ref, "components": doc["components"]})


def test_openapi_document_agrees_with_the_server(lineage_server):
    url = lineage_server.url
    doc = httpx.get(f"{url}/openapi.json").json()
    lin = open_lineage(url, token=WRITER)
    run = lin.start_run("r", "TrainingRun", "sft", SPEC, "sha256:r")
    run_body = {"name": "r2", "stage": "sft", "spec_hash": "h"}
    probes = [  # (path, body, accepted?)
        ("/v1/checkpoints", {"run_id": 0, "uri": "s3://c/0"}, False),
        ("/v1/checkpoints", {"run_id": "", "uri": "s3://c/0"}, False),
        ("/v1/checkpoints", {"run_id": run, "uri": "s3://c/1"}, True),
        ("/v1/checkpoints", {"run_id": f"lineage:{run}", "uri": "s3://c/2"}, True),
        ("/v1/runs", {**run_body, "initialized_from": ""}, False),
        ("/v1/runs", {**run_body, "consumed": [0]}, False),
        ("/v1/runs", {**run_body, "consumed": [""]}, False),
        ("/v1/runs", {**run_body, "initialized_from": "s3://c/1"}, True),
        ("/v1/deployments", {"model_id": 0, "name": "d"}, False),
        ("/v1/deployments", {"model_id": "", "name": "d"}, False),
    ]
    for path, body, accepted in probes:
        assert _validator(doc, path).is_valid(body) == accepted, (path, body)
        r = httpx.post(f"{url}{path}", headers=H, json=body)
        assert (r.status_code == 200) == accepted and r.status_code in (200, 422), (path, body, r.text)

    # an unparseable body is 400 (not a schema violation), and the document lists it
    for path in ("/v1/datasets", "/v1/runs", "/v1/events"):
        r = httpx.post(f"{url}{path}", headers={**H, "content-type": "application/json"}, content=b"{not json")
        assert r.status_code == 400 and r.json()["title"] == "Malformed body", r.text
        assert "400" in doc["paths"][path]["post"]["responses"]
    with pytest.raises(NotFound):
        lin.find("¹")
