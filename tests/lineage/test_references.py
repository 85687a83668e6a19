"""One resolver for every kind of reference (flashops.api.references), over SQLite, PostgreSQL and the HTTP API:
what the trainer trains from (checkpoint_uri) and what serving serves (model_uri)."""
import pytest

from flashops.api.references import ResolvedArtifact, UnresolvedReference, resolve_reference

S = "file:///s"


def _record(lin):
    pre = lin.start_run("p-pretrain", "TrainingRun", "pretrain", {"stage": "pretrain"}, "sha256:a",
                        consumed=["builtin:pretrain-text"], pipeline="p")
    ck1 = f"{S}/runs/p-pretrain/step-2"
    lin.add_checkpoint(pre, ck1, 2, "sha256:m1", {})
    lin.finish_run(pre, "succeeded", {})
    sft = lin.start_run("p-sft", "TrainingRun", "sft", {"stage": "sft"}, "sha256:b", consumed=["builtin:sft-chat"],
                        initialized_from=ck1, pipeline="p")
    ck2 = f"{S}/runs/p-sft/step-2"
    final = lin.add_checkpoint(sft, ck2, 2, "sha256:m2", {})
    lin.finish_run(sft, "succeeded", {})
    model = lin.add_model(final, f"{S}/models/p/step-2", "p", "step-2", "none", "sha256:mm")
    return ck1, ck2, final, model


def test_every_kind_of_reference_resolves_to_what_to_train_from_and_what_to_serve(lineage):
    ck1, ck2, final, model = _record(lineage)
    exported = ResolvedArtifact("", ck2, f"{S}/models/p/step-2", "lineage")
    for ref in ("p", "p-sft", f"lineage:{final}", f"lineage:{model}", str(model)):
        got = resolve_reference(ref, lineage=lineage)
        assert (got.checkpoint_uri, got.model_uri, got.source) == (exported.checkpoint_uri, exported.model_uri,
                                                                  "lineage"), ref
    stage1 = resolve_reference("p-pretrain", lineage=lineage)  # an intermediate stage: nothing exported
    assert (stage1.checkpoint_uri, stage1.model_uri) == (ck1, None)
    # a URI: lineage knows where its export went (under the pipeline's name); without lineage, its shape decides
    assert resolve_reference(ck2, lineage=lineage).model_uri == f"{S}/models/p/step-2"
    assert resolve_reference(ck2) == ResolvedArtifact(ck2, ck2, f"{S}/models/p-sft/step-2", "uri")
    assert resolve_reference(f"{S}/models/p/step-2").model_uri == f"{S}/models/p/step-2"
    assert resolve_reference(f"{S}/models/p/step-2").checkpoint_uri is None


def test_unknown_names_fall_back_to_the_store_then_say_what_to_do(lineage):
    _record(lineage)
    newest = {"solo": f"{S}/runs/solo/step-7"}
    got = resolve_reference("solo", lineage=lineage, latest_checkpoint=newest.get)
    assert (got.checkpoint_uri, got.model_uri, got.source) == (newest["solo"], f"{S}/models/solo/step-7", "store")
    with pytest.raises(UnresolvedReference, match="run that stage first"):
        resolve_reference("nobody", lineage=lineage, latest_checkpoint=newest.get)
    with pytest.raises(UnresolvedReference, match="no lineage is configured"):
        resolve_reference("lineage:3")
