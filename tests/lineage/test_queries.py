"""Every query, on SQLite, PostgreSQL and through the HTTP API: neighbours, ancestors/descendants to a
depth, provenance of a deployment, what derives from a dataset, run diffs, filters and pagination."""
import pytest

from flashops.api.lineage import InvalidInput, NotFound

from lineage._graph import record_pipeline


@pytest.fixture
def graph(lineage):
    ids = record_pipeline(lineage)
    ids["model"] = lineage.add_model(ids["final"], "file:///s/models/q/1", "q", "1", "int4")
    ids["dep"] = lineage.add_deployment(ids["model"], "quickstart-chat", "default", {"uid": "u"}, 100)
    ids["other"] = lineage.start_run("unrelated", "TrainingRun", "pretrain", {"x": 1}, "sha256:o",
                                     consumed=["s3://data/other"])
    return ids


def test_node_with_its_neighbours(lineage, graph):
    got = lineage.node(graph["ck"])
    assert got["node"]["uri"].endswith("step-200")
    assert [(n["edge"], n["node"]["id"]) for n in got["upstream"]] == [("produced", graph["pre"])]
    assert [(n["edge"], n["node"]["id"]) for n in got["downstream"]] == [("initialized_from", graph["sft"])]
    assert lineage.node("quickstart-chat")["node"]["id"] == graph["dep"]  # by name, too


def test_ancestors_to_a_depth(lineage, graph):
    one = lineage.ancestors(graph["dep"], depth=1)
    assert [n["id"] for n in one["nodes"]] == [graph["model"]]
    full = lineage.ancestors(graph["dep"], depth=10)
    by_id = {n["id"]: n["depth"] for n in full["nodes"]}
    # deployment <- model <- final <- sft <- (ck, sft-chat) ; ck <- pre <- pretrain-text
    assert by_id[graph["model"]] == 1 and by_id[graph["final"]] == 2 and by_id[graph["sft"]] == 3
    assert by_id[graph["ck"]] == 4 and by_id[graph["pre"]] == 5 and by_id[graph["ds"]] == 6
    assert graph["other"] not in by_id
    assert {(e["src"], e["dst"], e["type"]) for e in full["edges"]} >= {
        (graph["ck"], graph["sft"], "initialized_from"), (graph["ds"], graph["pre"], "consumed")}
    assert lineage.ancestors(graph["dep"], depth=10, limit=2)["truncated"] is True


def test_descendants_of_a_checkpoint(lineage, graph):
    got = lineage.descendants(graph["ck"], depth=2)
    assert {n["id"] for n in got["nodes"]} == {graph["sft"], graph["final"]}
    assert {n["id"] for n in lineage.descendants(graph["ck"])["nodes"]} == {
        graph["sft"], graph["final"], graph["model"], graph["dep"]}


def test_what_data_and_runs_produced_a_deployment(lineage, graph):
    got = lineage.provenance(graph["dep"])
    assert sorted(d["uri"] for d in got["datasets"]) == ["builtin:pretrain-text", "builtin:sft-chat"]
    assert sorted(r["name"] for r in got["runs"]) == ["quickstart-pretrain", "quickstart-sft"]
    assert [m["id"] for m in got["models"]] == [graph["model"]]


def test_what_derives_from_a_dataset(lineage, graph):
    got = lineage.derived(graph["ds"])
    assert [d["id"] for d in got["deployments"]] == [graph["dep"]]
    assert [m["id"] for m in got["models"]] == [graph["model"]]
    assert {c["step"] for c in got["checkpoints"]} == {100, 200, 50}
    assert lineage.derived("s3://data/other")["checkpoints"] == []


def test_diff_between_two_runs(lineage, graph):
    got = lineage.diff_runs(graph["pre"], "quickstart-sft")
    assert got["changes"] == [{"path": "stage", "a": "pretrain", "b": "sft", "change": "changed"}]
    assert lineage.diff_runs(graph["pre"], graph["pre"])["same_spec"] is True
    with pytest.raises(InvalidInput, match="not a run"):
        lineage.diff_runs(graph["pre"], graph["ds"])


def test_filters_and_pagination(lineage, graph):
    runs = lineage.list_nodes(type="run")["items"]
    assert [r["name"] for r in runs] == ["quickstart-pretrain", "quickstart-sft", "unrelated"]
    assert [r["name"] for r in lineage.list_nodes(pipeline="quickstart")["items"]] == [
        "quickstart-pretrain", "quickstart-sft"]
    assert [r["name"] for r in lineage.list_nodes(type="run", status="running")["items"]] == ["unrelated"]
    assert [n["id"] for n in lineage.list_nodes(uri="builtin:sft-chat")["items"]] == [
        lineage.find("builtin:sft-chat")]
    seen, after = [], None
    while True:
        page = lineage.list_nodes(limit=3, after=after)
        seen += [n["id"] for n in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 11
    with pytest.raises(InvalidInput):
        lineage.list_nodes(type="banana")


def test_unknown_things_are_not_found(lineage, graph):
    with pytest.raises(NotFound):
        lineage.node(987654)
    with pytest.raises(NotFound, match="nothing named 'nope'"):
        lineage.ancestors("nope")


def test_an_id_of_the_wrong_kind_is_refused_naming_the_field_and_the_rule(lineage, graph):
    """A run input, a run's starting point and a deployment's model given by id must exist and be of a kind
    that can play that part; nothing is recorded otherwise."""
    before = len(lineage.list_nodes(limit=1000)["items"])
    with pytest.raises(NotFound, match=rf"consumed\[0\]: lineage:{graph['dep']} is a deployment: a run consumes"):
        lineage.start_run("r", "TrainingRun", "sft", {}, "sha256:r", consumed=[graph["dep"]])
    with pytest.raises(NotFound, match=rf"initialized_from: lineage:{graph['ds']} is a dataset: a run starts from"):
        lineage.start_run("r", "TrainingRun", "sft", {}, "sha256:r", initialized_from=graph["ds"])
    with pytest.raises(NotFound, match=r"model_id: lineage:999999 does not exist: a deployment serves a model"):
        lineage.add_deployment(999999, "d", "default", {"uid": "x"}, 1)
    assert len(lineage.list_nodes(limit=1000)["items"]) == before
