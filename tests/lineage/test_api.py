"""The HTTP API itself: auth scopes, problem+json errors, health, batch ingestion, token configuration."""
import httpx
import pytest

from flashops.api.lineage import Forbidden, NotFound, Unauthorized, open_lineage
from flashops.api.lineage.auth import TokenConfigError, load_tokens, parse_tokens

from lineage._graph import READER, WRITER


def test_no_token_401_read_token_cannot_write_403(lineage_server):
    url = lineage_server.url
    r = httpx.get(f"{url}/v1/nodes")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"] == "Bearer" and r.json()["status"] == 401
    assert httpx.get(f"{url}/v1/nodes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(Unauthorized):
        open_lineage(url, token="wrong").upsert_dataset("s3://d")
    reader = open_lineage(url, token=READER)
    with pytest.raises(Forbidden, match="needs 'write'"):
        reader.upsert_dataset("s3://d")
    writer = open_lineage(url, token=WRITER)
    ds = writer.upsert_dataset("s3://d")
    assert reader.node(ds)["node"]["uri"] == "s3://d"  # read works for both
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"  # health needs no token


def test_errors_are_problem_json(lineage_server):
    h = {"Authorization": f"Bearer {WRITER}"}
    for r, status in [(httpx.get(f"{lineage_server.url}/v1/nodes/5555", headers=h), 404),
                      (httpx.post(f"{lineage_server.url}/v1/runs", headers=h, json={"name": "x"}), 422),
                      (httpx.get(f"{lineage_server.url}/v1/nodes/0", headers=h), 422),
                      (httpx.get(f"{lineage_server.url}/no/such/path", headers=h), 404),
                      (httpx.post(f"{lineage_server.url}/v1/datasets", headers=h, content=b"{not json"), 400)]:
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["status"] == status and body["title"] and body["detail"]
    r = httpx.post(f"{lineage_server.url}/v1/runs", headers=h, json={"name": "x"})
    assert "body.stage: Field required" in r.json()["detail"]


def test_batch_of_events_is_one_transaction(lineage_server):
    lin = open_lineage(lineage_server.url, token=WRITER)
    events = [
        {"op": "upsert_dataset", "args": {"uri": "s3://data/a"}},
        {"op": "start_run", "args": {"name": "b1", "kind": "TrainingRun", "stage": "sft", "spec": {},
                                     "spec_hash": "h", "consumed": ["$0"]}},
        {"op": "add_checkpoint", "args": {"run_id": "$1", "uri": "s3://ck/b1/1", "step": 1}},
        {"op": "finish_run", "args": {"run_id": "$1", "status": "succeeded"}},
    ]
    ds, run, ck, _ = lin.record_events(events)
    assert lin.resolve("b1")["id"] == ck and lin.ancestors(ck)["nodes"][-1]["id"] == ds
    assert lin.record_events(events)[:3] == [ds, run, ck]  # idempotent as a whole
    bad = [{"op": "upsert_dataset", "args": {"uri": "s3://data/never"}},
           {"op": "add_checkpoint", "args": {"run_id": 999999, "uri": "s3://ck/x", "step": 1}}]
    with pytest.raises(NotFound, match=r"events\[1\] \(add_checkpoint\)"):
        lin.record_events(bad)
    with pytest.raises(NotFound):
        lin.find("s3://data/never")  # the first event was rolled back with the second


def test_token_configuration(tmp_path):
    assert parse_tokens("a1:read, b2:read+write\nc3:write") == {
        "a1": {"read"}, "b2": {"read", "write"}, "c3": {"write"}}
    with pytest.raises(TokenConfigError, match="has no scopes"):
        parse_tokens("justatoken")
    with pytest.raises(TokenConfigError, match="unknown scope"):
        parse_tokens("tok:admin")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "tokens").write_text("fromfile:read\n")
    got = load_tokens({"FLASHOPS_LINEAGE_TOKENS": "env:read+write", "FLASHOPS_LINEAGE_TOKENS_FILE": str(secret),
                       "FLASHOPS_LINEAGE_TOKEN": "helm"})
    assert got == {"env": {"read", "write"}, "fromfile": {"read"}, "helm": {"read", "write"}}


def test_concurrent_writers_sharing_a_dataset_both_succeed(lineage_server):
    """Two operators recording runs on the same new dataset at once: the unique-key race is retried,
    not reported, and the dataset is recorded once."""
    from concurrent.futures import ThreadPoolExecutor

    def record(i):
        lin = open_lineage(lineage_server.url, token=WRITER)
        try:
            # opposite orders in one batch, so concurrent batches also deadlock now and then
            return lin.record_events([
                {"op": "start_run", "args": {"name": f"race-{i}-{j}", "kind": "TrainingRun", "stage": "sft", "spec": {},
                                             "spec_hash": "h", "consumed": ["s3://shared/a", "s3://shared/b"][::(-1) ** j]}}
                for j in range(4)])
        finally:
            lin.close()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(record, range(8)))
    assert all(len(r) == 4 for r in results)
    lin = open_lineage(lineage_server.url, token=READER)
    shared = lin.list_nodes(type="dataset")["items"]
    assert sorted(d["uri"] for d in shared) == ["s3://shared/a", "s3://shared/b"]
    assert len(lin.derived("s3://shared/a")["runs"]) == 32
