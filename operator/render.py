"""What the operator would create for a file of specs, computed offline: `flashops render -f FILE`.

    flashops render -f examples/quickstart.yaml | kubectl apply --dry-run=client -f -

A TrainingRun renders as its ConfigMap + PyTorchJob/TrainJob; a TrainingPipeline as its stage TrainingRuns
(each stage starts from the previous stage's final checkpoint, known only at run time, so the rendering
names the previous run instead, which lineage resolves) and their children; a ModelDeployment as its
InferenceService, with a model URI given or the source as written.
"""
from __future__ import annotations

from typing import Any

from flashops.api import spec as S
from flashops.operator import children as C
from flashops.operator.config import OperatorConfig
from flashops.operator.inference import build_inference_service


def render_objects(objects: list[S.SpecObject], config: OperatorConfig, namespace: str = "default",
                   model_uri: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for obj in objects:
        obj = obj.model_copy(deep=True)
        obj.metadata.namespace = obj.metadata.namespace or namespace
        if isinstance(obj, S.TrainingRun):
            out += C.training_children(obj, 0, config)
        elif isinstance(obj, S.TrainingPipeline):
            previous = None
            for i in range(len(obj.spec.stages)):
                run = S.pipeline_stage_run(obj, i, previous)
                if obj.spec.stages[i].is_eval:  # an evaluation Job of the previous stage; it trains nothing
                    out.append(C.build_eval_job(run, config, obj))
                    continue
                stage_run = run.to_dict()
                stage_run["metadata"]["labels"].update({C.LABEL_MANAGED_BY: C.MANAGER, C.LABEL_OWNER_KIND: obj.kind,
                                                        C.LABEL_OWNER: obj.name})
                out.append(stage_run)
                out += C.training_children(run, 0, config)
                previous = run.name
        else:
            out.append(build_inference_service(obj, model_uri or obj.spec.source, config))
    return out
