"""Pipeline sequencing and where a model is exported: decided here once, for both ways a pipeline runs.

The Kubeflow SDK's shape: one runner over interchangeable backends. `advance(pipeline, backend)` looks at the
stages in order and starts the first one that has not run; a backend says how a stage's TrainingRun is
started and how it went:

    LocalBackend    (flashops.trainers.runner)  start() trains the stage in this process and returns Succeeded;
                                                `flashops run` calls advance() until the pipeline is done.
    ClusterBackend  (flashops.operator.reconcile) start() creates the stage's TrainingRun object on the API
                                                server; the operator calls advance() once per reconcile.

    state = advance(pipeline, backend)
    state.done, state.current, state.final_checkpoint, state.model_uri

The rules both backends share:
- stage i's TrainingRun is `stage_run(pipeline, i, previous)`: named `<pipeline>-<stage>`, labelled with the
  pipeline, the stage and whether it is the final one, and (unless its spec says otherwise) initialised from
  the previous stage's final checkpoint (or, when that is unknown, its run name, resolved through lineage);
- the pipeline is done when every stage has succeeded; it has failed when a stage failed;
- only a pipeline's final training stage, or a standalone TrainingRun, writes a serving export (`exports(run)`),
  at `export_location(checkpoint, run)`: `<store>/models/<pipeline or run>/step-<n>`, next to the checkpoints;
- an eval stage (`stage: eval`) becomes an `EvaluationJob` of the previous training stage's final checkpoint
  (the backend evaluates it and records the result in lineage on that checkpoint). It trains nothing, so the
  stage after it still starts from that checkpoint, and it is never the exporting stage.
Torch-free and Kubernetes-free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flashops.api.spec import EvalStageSpec, TrainingPipeline, TrainingRun

LABEL_PIPELINE = "flashops.dev/pipeline"
LABEL_STAGE = "flashops.dev/stage"
LABEL_FINAL_STAGE = "flashops.dev/final-stage"  # "true" on a pipeline's last stage: the one that exports

_CHECKPOINT_URI = re.compile(r"^(?P<root>.+?)/runs/(?P<run>[^/]+)/step-(?P<step>\d+)/?$")
_MODEL_URI = re.compile(r"^(?P<root>.+?)/models/(?P<name>[^/]+)/(?P<version>[^/]+)/?$")


@dataclass(frozen=True)
class EvaluationJob:
    """What an eval stage becomes: evaluate `model` (the previous training stage's final checkpoint URI, or its
    run name when the URI is not known) on spec.eval.suites and record it in lineage on that checkpoint."""

    name: str  # <pipeline>-<stage>, like a training stage's run (the cluster Job's name)
    namespace: str | None
    labels: dict
    spec: "EvalStageSpec"
    model: str | None
    kind: str = "Evaluation"

    @property
    def stage(self) -> str:
        return self.labels[LABEL_STAGE]


def training_stage_indices(pipeline: "TrainingPipeline") -> list[int]:
    return [i for i, s in enumerate(pipeline.spec.stages) if not s.is_eval]


def stage_run(pipeline: "TrainingPipeline", index: int, previous_checkpoint: str | None
              ) -> "TrainingRun | EvaluationJob":
    """The TrainingRun stage `index` becomes (an EvaluationJob for an eval stage). A stage without initFrom starts
    from `previous_checkpoint` (the previous training stage's final checkpoint URI, or its run name when the URI
    is not known)."""
    from flashops.api.spec import ObjectMeta, TrainingRun

    stage = pipeline.spec.stages[index]
    name = f"{pipeline.metadata.name}-{stage.name}"[:63].rstrip("-")
    labels = {**pipeline.metadata.labels, LABEL_PIPELINE: pipeline.metadata.name, LABEL_STAGE: stage.name}
    if stage.is_eval:
        return EvaluationJob(name, pipeline.metadata.namespace, {**labels, LABEL_FINAL_STAGE: "false"},
                             stage.spec.model_copy(deep=True), previous_checkpoint)
    spec = stage.spec.model_copy(deep=True)
    if spec.init_from is None and previous_checkpoint is not None:
        spec.init_from = previous_checkpoint
    final = index == training_stage_indices(pipeline)[-1]  # the last training stage exports, never an eval stage
    return TrainingRun(
        metadata=ObjectMeta(name=name, namespace=pipeline.metadata.namespace,
                            labels={**labels, LABEL_FINAL_STAGE: "true" if final else "false"}),
        spec=spec,
    )


def exports(run: "TrainingRun") -> bool:
    """Does this run write a serving export when it finishes? A standalone run does; of a pipeline, only the
    final stage (earlier stages' checkpoints are only starting points)."""
    labels = run.metadata.labels
    return LABEL_PIPELINE not in labels or labels.get(LABEL_FINAL_STAGE) == "true"


def export_name(run: "TrainingRun") -> str:
    """The model's name: the pipeline's for a pipeline stage, else the run's."""
    return run.metadata.labels.get(LABEL_PIPELINE) or run.metadata.name


def export_location(checkpoint_uri: str, name: str | None = None) -> str:
    """Where the serving export of a checkpoint lives: `<store>/runs/<run>/step-<n>` ->
    `<store>/models/<name>/step-<n>`, name defaulting to the run's (pass `export_name(run)` or the pipeline's).
    A model URI is returned unchanged. Raises ValueError for anything else."""
    if _MODEL_URI.match(str(checkpoint_uri)) and not _CHECKPOINT_URI.match(str(checkpoint_uri)):
        return str(checkpoint_uri)
    m = _CHECKPOINT_URI.match(str(checkpoint_uri))
    if not m:
        raise ValueError(f"{checkpoint_uri!r} is neither a checkpoint URI (<store>/runs/<run>/step-<n>) nor a model "
                         "URI (<store>/models/<name>/<version>)")
    return f"{m['root']}/models/{name or m['run']}/step-{m['step']}"


# The export holds one self-contained Hugging Face folder per precision: full precision at the model URI, the
# compressed-tensors INT4 one (QAT exports, or `--int4`) in its int4/ subfolder (flashops.model.export writes
# them; flashops.serving and the vLLM runtime read them through export_variant).
INT4_DIR = "int4"


def export_variant(model_uri: str, quantization: str) -> str:
    """The folder of an export that an engine loads for `quantization` ("none" | "int4")."""
    if quantization not in ("none", "int4"):
        raise ValueError(f"quantization={quantization!r}: use 'none' or 'int4'")
    return f"{str(model_uri).rstrip('/')}/{INT4_DIR}" if quantization == "int4" else str(model_uri)


# ------------------------------------------------------------------------------------------ sequencing


@dataclass(frozen=True)
class StageOutcome:
    """How a stage's TrainingRun (or EvaluationJob) is doing, as its backend sees it."""

    state: str  # Pending | Running | Succeeded | Failed | Suspended
    checkpoint: str | None = None  # its newest complete checkpoint (final once Succeeded); an eval: what it evaluated
    message: str = ""
    evaluation: dict | None = None  # an eval stage's result, when the backend has it


class Backend(Protocol):
    def outcome(self, run: "TrainingRun | EvaluationJob") -> StageOutcome | None:
        """How the stage's run (or evaluation) is doing; None when it was never started."""

    def start(self, run: "TrainingRun | EvaluationJob") -> StageOutcome:
        """Start the stage's run or evaluation (the local backend runs it to the end); returns its outcome so far."""


@dataclass
class StageView:
    index: int
    name: str
    run: "TrainingRun | EvaluationJob"
    outcome: StageOutcome | None  # None: waiting for an earlier stage


@dataclass
class PipelineState:
    stages: list[StageView] = field(default_factory=list)
    current: int | None = None  # the stage running or waiting to run now; None when done
    done: bool = False
    failed: bool = False
    final_checkpoint: str | None = None  # the last stage's final checkpoint, once done
    model_uri: str | None = None  # its serving export, once done

    @property
    def current_stage(self) -> StageView | None:
        return self.stages[self.current] if self.current is not None else None


def advance(pipeline: "TrainingPipeline", backend: Backend, *, start: bool = True) -> PipelineState:
    """One step of the pipeline: walk the stages in order, start the first that never ran (unless start=False),
    and report where everything stands. Safe to call any number of times (level-triggered)."""
    state = PipelineState()
    previous: str | None = None
    blocked = False
    for i, stage in enumerate(pipeline.spec.stages):
        run = stage_run(pipeline, i, previous)
        if blocked:
            state.stages.append(StageView(i, stage.name, run, None))
            continue
        outcome = backend.outcome(run)
        if outcome is None and start:
            outcome = backend.start(run)
        state.stages.append(StageView(i, stage.name, run, outcome))
        if outcome is not None and outcome.state == "Succeeded":
            if not stage.is_eval:  # an evaluation trains nothing: the next stage starts where this one found it
                previous = outcome.checkpoint or run.name
                state.final_checkpoint = outcome.checkpoint
            continue
        state.current, blocked = i, True
        state.failed = outcome is not None and outcome.state == "Failed"
    if not blocked:
        state.done = True
        last = state.stages[training_stage_indices(pipeline)[-1]].run
        state.model_uri = export_location(state.final_checkpoint, export_name(last)) if state.final_checkpoint else None
    else:
        state.final_checkpoint = None
    return state
