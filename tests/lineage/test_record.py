"""Recording through the direct-SQL store, on SQLite and PostgreSQL: idempotent, transactional, resolvable."""
import pytest
from sqlalchemy import inspect

from flashops.api.lineage import Conflict, InvalidInput, NotFound, open_lineage
from flashops.api.lineage import migrate

from lineage._graph import SPEC, counts, record_pipeline


def test_every_write_twice_records_once(lineage):
    ids = record_pipeline(lineage)
    model = lineage.add_model(ids["final"], "file:///s/models/q/1", "q", "1", "int4", "sha256:mm")
    dep = lineage.add_deployment(model, "quickstart-chat", "default", {"kind": "ModelDeployment", "uid": "u-1"}, 10)
    before = counts(lineage)
    assert record_pipeline(lineage) == ids
    assert lineage.add_model(ids["final"], "file:///s/models/q/1", "q", "1", "int4", "sha256:mm") == model
    # the same open deployment: the canary moving to 100% updates the share, it is not a new deployment
    assert lineage.add_deployment(model, "quickstart-chat", "default", {"uid": "u-1"}, 100) == dep
    lineage.close_deployment(dep)
    lineage.close_deployment(dep)
    assert counts(lineage) == before
    d = lineage.node(dep)["node"]
    assert d["traffic_percent"] == 100 and d["ended_at"] is not None
    # once closed, serving the same model again is a new deployment (a new time range)
    assert lineage.add_deployment(model, "quickstart-chat", "default", {"uid": "u-1"}, 100) != dep


def test_a_failed_event_leaves_nothing_behind(lineage):
    before = counts(lineage)
    with pytest.raises(NotFound, match="lineage:999999"):
        lineage.start_run("r", "TrainingRun", "sft", SPEC, "sha256:x",
                          consumed=["s3://data/new-corpus"], initialized_from=999999)
    assert counts(lineage) == before  # neither the run nor the dataset it would have consumed
    assert lineage.list_nodes(uri="s3://data/new-corpus")["items"] == []


def test_checkpoint_uri_of_another_run_is_a_conflict(lineage):
    ids = record_pipeline(lineage)
    with pytest.raises(Conflict, match="already recorded as produced by run"):
        lineage.add_checkpoint(ids["sft"], "file:///s/quickstart-pretrain/step-200", 200)
    with pytest.raises(NotFound, match="is a dataset, not a run"):
        lineage.add_checkpoint(ids["ds"], "file:///s/x", 1)


def test_resolve_run_pipeline_id_and_uri(lineage):
    ids = record_pipeline(lineage)
    assert lineage.resolve("quickstart-pretrain")["uri"] == "file:///s/quickstart-pretrain/step-200"
    got = lineage.resolve("quickstart")  # the pipeline: the last stage's final checkpoint
    assert (got["type"], got["id"], got["model"]) == ("checkpoint", ids["final"], None)
    assert lineage.resolve(f"lineage:{ids['ck']}")["uri"].endswith("step-200")
    model = lineage.add_model(ids["final"], "file:///s/models/q/1", "q", "1", "none")
    got = lineage.resolve("quickstart")  # once exported, the model is what a deployment serves
    assert (got["type"], got["uri"], got["checkpoint"]["id"]) == ("model", "file:///s/models/q/1", ids["final"])
    assert lineage.resolve(str(model))["id"] == model
    lineage.add_deployment(model, "chat", "ns")
    assert lineage.resolve("chat")["id"] == model
    with pytest.raises(NotFound, match="nothing to resolve for 'nope'"):
        lineage.resolve("nope")


def test_pipeline_whose_last_stage_failed_resolves_to_the_last_succeeded_stage(lineage):
    ids = record_pipeline(lineage)
    rl = lineage.start_run("quickstart-rl", "TrainingRun", "rl", SPEC, "sha256:rl", initialized_from=ids["final"],
                           k8s_ref={"uid": "k-1", "labels": {"flashops.dev/pipeline": "quickstart"}})
    lineage.add_checkpoint(rl, "file:///s/quickstart-rl/step-5", 5)
    assert lineage.resolve("quickstart")["id"] == ids["final"]  # rl is still running
    lineage.finish_run(rl, "failed")
    assert lineage.resolve("quickstart")["id"] == ids["final"]
    lineage.finish_run(rl, "succeeded")
    assert lineage.resolve("quickstart")["uri"] == "file:///s/quickstart-rl/step-5"


def test_init_from_an_unknown_uri_is_kept_and_adopted_when_its_run_reports_it(lineage):
    a = lineage.start_run("b", "TrainingRun", "sft", SPEC, "sha256:b", initialized_from="s3://bkt/ext/step-9")
    ext = lineage.ancestors(a, depth=1)["nodes"][0]
    assert (ext["type"], ext["uri"], ext["run_id"]) == ("checkpoint", "s3://bkt/ext/step-9", None)
    producer = lineage.start_run("a", "TrainingRun", "pretrain", SPEC, "sha256:a")
    assert lineage.add_checkpoint(producer, "s3://bkt/ext/step-9", 9) == ext["id"]
    assert [n["name"] for n in lineage.ancestors(a, depth=2)["nodes"] if n["type"] == "run"] == ["a"]


def test_bad_input_names_the_field_and_the_fix(lineage):
    run = lineage.start_run("r", "TrainingRun", "sft", SPEC, "sha256:x")
    with pytest.raises(InvalidInput, match="status: 'finished' is not one of running, succeeded"):
        lineage.finish_run(run, "finished")
    with pytest.raises(InvalidInput, match="uri: contains a NUL"):
        lineage.upsert_dataset("s3://a\x00b")
    with pytest.raises(InvalidInput, match="run_id: 'abc' is not a lineage id"):
        lineage.finish_run("abc", "failed")
    with pytest.raises(InvalidInput, match="traffic_percent: 101 is out of range 0..100"):
        lineage.add_deployment("s3://m/1", "d", traffic_percent=101)
    # a NaN loss is a real metric: kept, as a string JSON can carry
    lineage.finish_run(run, "failed", {"loss": float("nan"), "grad_norm": float("inf")})
    assert lineage.node(run)["node"]["metrics"] == {"loss": "nan", "grad_norm": "inf"}


def test_migrations_up_and_down(db_url):
    lin = open_lineage(db_url)  # upgrade head on open
    assert migrate.current(lin.engine) == migrate.head()
    assert {"nodes", "edges", "runs", "datasets", "checkpoints", "models", "deployments"} <= set(
        inspect(lin.engine).get_table_names())
    migrate.downgrade(lin.engine, "base")
    assert migrate.current(lin.engine) is None
    assert set(inspect(lin.engine).get_table_names()) <= {"alembic_version"}
    lin.close()
    lin = open_lineage(db_url)  # and back up, on an existing (empty) database
    assert lin.upsert_dataset("builtin:x") == 1
    lin.close()
