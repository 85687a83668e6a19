"""One pipeline, run both ways: `flashops run`'s local backend, and the operator's cluster backend against the
Kubernetes emulator, where the test plays Kubeflow by running the operator's trainer pod spec with the real
trainer entry point and then marking the job Succeeded. Both must export the same model URI (relative to the
store) from the final stage only, and leave the same lineage graph."""
from __future__ import annotations

import pytest
import yaml

from fixtures.k8s import GV, play_trainer_pod, wait_state

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

PIPELINE = """
apiVersion: flashops.dev/v1alpha1
kind: TrainingPipeline
metadata: {name: twostep}
spec:
  stages:
  - name: pretrain
    spec: {stage: pretrain, training: {steps: 2, batchSize: 2, seqLen: 32}, checkpoint: {every: 1, keep: 5}}
  - name: sft
    spec: {stage: sft, training: {steps: 2, batchSize: 2, seqLen: 32}, checkpoint: {every: 1, keep: 5}}
"""


def graph_shape(lineage, model_uri: str, store_root: str) -> tuple:
    """The model's ancestry with ids and store roots taken out: (nodes as (type, label), edges by label)."""
    walk = lineage.ancestors(model_uri, depth=20)
    nodes = {walk["root"]["id"]: walk["root"], **{n["id"]: n for n in walk["nodes"]}}

    def label(n: dict) -> tuple:
        what = n.get("uri") or n.get("name") or ""
        return n["type"], what.replace(store_root, "<store>")

    return (sorted(label(n) for n in nodes.values()),
            sorted((label(nodes[e["src"]]), e["type"], label(nodes[e["dst"]])) for e in walk["edges"]))


def test_the_same_pipeline_locally_and_on_the_cluster(k8s, start_operator, tmp_path, monkeypatch):
    from flashops.api.lineage import open_lineage
    from flashops.api.spec import load_text
    from flashops.storage import open_store
    from flashops.trainers.runner import run_pipeline

    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    for var in ("FLASHOPS_LINEAGE_URL", "FLASHOPS_LINEAGE_RUN_ID", "FLASHOPS_RUN_NAME"):
        monkeypatch.delenv(var, raising=False)

    # ---- locally: flashops run's backend
    local_root = f"file://{tmp_path}/local/default"
    local_lineage = open_lineage(f"sqlite:///{tmp_path}/local-lineage.db")
    results, local_model = run_pipeline(load_text(PIPELINE)[0], open_store(local_root), local_lineage)
    assert [r.run for r in results] == ["twostep-pretrain", "twostep-sft"]

    # ---- on the cluster: the operator creates each stage; the "pods" run the real trainer
    cluster_db = f"sqlite:///{tmp_path}/cluster-lineage.db"
    start_operator(checkpoint_root=f"file://{tmp_path}/cluster", lineage_url=cluster_db)
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=PIPELINE)
    for stage in ("pretrain", "sft"):
        play_trainer_pod(k8s, tmp_path, monkeypatch, f"twostep-{stage}")
    pipeline = wait_state(k8s, "trainingpipelines", "twostep", "Succeeded", timeout=30)
    cluster_root = f"file://{tmp_path}/cluster/default"
    cluster_model = pipeline["status"]["modelUri"]

    # ---- the same export, from the final stage only
    assert local_model == f"{local_root}/models/twostep/step-2"
    assert cluster_model == f"{cluster_root}/models/twostep/step-2"
    for root in (local_root, cluster_root):
        assert [m.uri for m in open_store(root).list_models()] == [f"{root}/models/twostep/step-2"]
    stage_run = k8s.get(GV, "trainingruns", "twostep-sft")
    assert stage_run["status"]["modelUri"] == cluster_model
    assert "modelUri" not in k8s.get(GV, "trainingruns", "twostep-pretrain")["status"]

    # ---- the same lineage graph
    local_shape = graph_shape(local_lineage, local_model, local_root)
    cluster_shape = graph_shape(open_lineage(cluster_db), cluster_model, cluster_root)
    assert local_shape == cluster_shape
    types = sorted(t for t, _ in local_shape[0])
    assert types.count("run") == 2 and types.count("model") == 1 and types.count("checkpoint") == 2
    assert types.count("dataset") == 2
