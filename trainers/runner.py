"""Run a TrainingRun or a whole TrainingPipeline in this process (the embedded default of `flashops run`):
checkpoints in the store (default file://$FLASHOPS_HOME/store), lineage in SQLite ($FLASHOPS_HOME/lineage.db).

    from flashops.trainers import run_training, run_pipeline
    result = run_training(run)                        # RunResult(checkpoint_uri, metrics, ...)
    results, model = run_pipeline(pipeline)           # stage by stage, each from the previous checkpoint

Pipeline sequencing (which stage next, what it starts from, when it is done, where the model goes) is
flashops.api.pipeline's; this module is its local backend (`LocalBackend`), as the operator is its cluster one.
Every stage is preflighted before it starts, and a pipeline preflights what it can of all stages (spec
values, data) before the first one runs, so a typo in the last stage fails in seconds, not after an hour.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from flashops.api.pipeline import EvaluationJob, StageOutcome, advance, export_name, exports
from flashops.api.spec import TrainingPipeline, TrainingRun, pipeline_stage_run
from flashops.trainers.engine import RunResult, Trainer

log = logging.getLogger("flashops.trainers")


def _open_defaults(store, lineage):
    if store is None or isinstance(store, str):
        from flashops.storage import open_store

        store = open_store(store)
    from flashops.api.lineage import NullLineage, open_lineage

    if lineage is None:
        lineage = open_lineage()
    elif lineage is False:
        lineage = NullLineage()  # off: the trainer always gets a Lineage
    return store, lineage


def run_training(run: TrainingRun, store=None, lineage=None, *, on_step: Callable[[dict], None] | None = None,
                 log_dir: str | Path | None = None, crash_after: int | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> RunResult:
    """Train one run to completion (resuming from its latest checkpoint). store: a CheckpointStore, a URI or
    None (run.spec.checkpoint.uri, else the default); lineage: a Lineage (NullLineage() = off), None (the
    default: open_lineage()) or False (off, the older spelling). on_progress(phase, done, total): work before
    the first step (the RL curriculum's profiling), for a progress bar."""
    store, lineage = _open_defaults(store if store is not None else run.spec.checkpoint.uri, lineage)
    trainer = Trainer(run, store=store, lineage=lineage, on_step=on_step, log_dir=log_dir, crash_after=crash_after,
                      on_progress=on_progress)
    trainer.preflight()
    return trainer.fit()


def export_finished_run(run: TrainingRun, checkpoint_uri: str | None, store, lineage) -> str | None:
    """The serving export a finished run owes (flashops.api.pipeline.exports: a standalone run or a pipeline's
    final stage), at export_location(checkpoint, export_name(run)); None when the run owes none."""
    if not checkpoint_uri or not exports(run):
        return None
    from flashops.api.lineage import as_lineage
    from flashops.storage import open_store, split_checkpoint_uri

    root, _, step = split_checkpoint_uri(checkpoint_uri)
    # lands at export_location(checkpoint_uri, export_name(run)): the store's models/<name>/<version>
    return export_model(open_store(root), as_lineage(lineage), checkpoint_uri, export_name(run), f"step-{step}")


def preflight_pipeline(pipeline: TrainingPipeline, store=None, lineage=None) -> None:
    """Check every stage's spec and data before the first one runs (initFrom of later stages is the
    previous stage's output, so it is checked when that stage starts)."""
    from flashops.trainers import checks
    from flashops.trainers.suites import load_suite

    for i, stage in enumerate(pipeline.spec.stages):
        if stage.is_eval:  # its suites load and parse now (a typo fails before any training)
            from flashops.api.evaluation import SuiteError
            from flashops.trainers.errors import DataError

            for j, uri in enumerate(stage.spec.eval.suites):
                try:
                    load_suite(uri)
                except SuiteError as e:
                    raise DataError(f"{pipeline.kind}/{pipeline.name}: spec.stages[{i}].spec.eval.suites[{j}]: {e}") from None
            continue
        run = pipeline_stage_run(pipeline, i, None)
        checks.preflight(run, store, lineage, check_init=i == 0 or run.spec.init_from is not None)


Evaluate = Callable[[EvaluationJob, str], dict]


class LocalBackend:
    """flashops.api.pipeline's local backend: start() trains the stage here, to the end, then exports it if
    it is the pipeline's final training stage; an eval stage is handed to `evaluate(job, checkpoint_uri)` (the
    caller's: `flashops run` evaluates through the serving engine, which this package does not import), which
    records the result in lineage and returns it. A failure raises (TrainerError for bad specs)."""

    def __init__(self, store, lineage, *, on_stage=None, on_step=None, log_root=None, export: bool = True,
                 evaluate: Evaluate | None = None, on_progress=None):
        self.store, self.lineage, self.export = store, lineage, export
        self.on_stage, self.on_step, self.log_root = on_stage, on_step, log_root
        self.evaluate = evaluate
        self.on_progress = on_progress
        self.results: dict[str, RunResult] = {}
        self.evaluations: dict[str, dict] = {}  # eval stage's job name -> its result
        self.model_uri: str | None = None

    def outcome(self, run: TrainingRun | EvaluationJob) -> StageOutcome | None:
        if isinstance(run, EvaluationJob):
            found = self.evaluations.get(run.name)
            return StageOutcome("Succeeded", run.model, evaluation=found) if found else None
        result = self.results.get(run.name)
        return StageOutcome("Succeeded", result.checkpoint_uri) if result else None

    def start(self, run: TrainingRun | EvaluationJob) -> StageOutcome:
        if self.on_stage:
            self.on_stage(len(self.results) + len(self.evaluations), run)
        if isinstance(run, EvaluationJob):
            if self.evaluate is None:
                from flashops.trainers.errors import TrainerError

                raise TrainerError(f"stage {run.stage!r} (stage: eval) evaluates through the serving engine: run the "
                                   "pipeline with `flashops run -f FILE` (or the operator), which provide it")
            self.evaluations[run.name] = self.evaluate(run, run.model)
            return StageOutcome("Succeeded", run.model, evaluation=self.evaluations[run.name])
        log_dir = Path(self.log_root) / run.metadata.name if self.log_root else None
        result = run_training(run, self.store, self.lineage, on_step=self.on_step, log_dir=log_dir,
                              on_progress=self.on_progress)
        self.results[run.name] = result
        if self.export:
            self.model_uri = export_finished_run(run, result.checkpoint_uri, self.store, self.lineage) or self.model_uri
        return StageOutcome("Succeeded", result.checkpoint_uri)


def run_pipeline(pipeline: TrainingPipeline, store=None, lineage=None, *,
                 on_stage: Callable[[int, TrainingRun | EvaluationJob], None] | None = None,
                 on_step: Callable[[dict], None] | None = None, log_root: str | Path | None = None,
                 export: bool = True, evaluate: Evaluate | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> tuple[list[RunResult], str | None]:
    """Run the stages in order; returns the training stages' results and the exported model URI (None if
    export=False). Eval stages go to `evaluate` (see LocalBackend)."""
    store, lineage = _open_defaults(store, lineage)
    preflight_pipeline(pipeline, store, lineage)
    backend = LocalBackend(store, lineage, on_stage=on_stage, on_step=on_step, log_root=log_root, export=export,
                           evaluate=evaluate, on_progress=on_progress)
    state = advance(pipeline, backend)  # the local backend runs each stage to the end, so one pass finishes
    assert state.done, f"pipeline {pipeline.name} stopped at stage {state.current}"
    results = [backend.results[s.run.name] for s in state.stages if s.run.name in backend.results]
    return results, (state.model_uri if export else None)


def export_model(store, lineage, checkpoint_uri: str, name: str, version: str | None = None,
                 int4: bool = False, *, max_file_bytes: int | None = None, tokenizer: str | Path | None = None,
                 verify: bool = True) -> str:
    """Write the checkpoint's model as a serving export and record it in lineage: the Hugging Face
    DeepSeek-V3 folder of flashops.model.export (safetensors files of at most max_file_bytes, default 5 GB,
    with their index, config.json, the MTP layer, tokenizer), plus int4/ (compressed-tensors INT4 routed
    experts) when the run used QAT, or when int4=True (round-to-nearest of a model trained without QAT).

    Streamed: the checkpoint is read one tensor at a time (ranged reads of its shards, checked against the
    manifest first unless verify=False) and each file is streamed into the store, the manifest last, so
    memory is bounded by the largest tensor, not the model."""
    import torch

    from flashops.model.config import JoyAIConfig
    from flashops.model.export import MAX_FILE_BYTES, write_export
    from flashops.model.model import JoyAIFlash
    from flashops.model.tokenizer import TOKENIZER_FILE
    from flashops.storage import AlreadyExistsError, StoreConfigError, open_store, split_checkpoint_uri

    root, _, step = split_checkpoint_uri(checkpoint_uri)
    source = open_store(root)
    meta = source.meta(checkpoint_uri)
    if not meta.model_config:
        raise StoreConfigError(f"{checkpoint_uri} has no model_config in its manifest: it was not saved by a "
                               "flashops trainer, so its architecture is unknown")
    cfg = JoyAIConfig.from_dict(meta.model_config)
    version = version or f"step-{step}"
    qat = (meta.extra or {}).get("qat") == "int4" or int4
    # the group size QAT trained with (checkpoint manifest); older checkpoints: the model config's
    group_size = ((meta.extra or {}).get("qat_group_size") or cfg.qat_group_size) if qat else None
    try:
        writer = store.begin_model(name, version)
    except AlreadyExistsError:
        uri = store.model_uri(name, version)
        manifest = store.model_manifest(uri)["manifest_sha256"]
    else:
        tensors = source.open_tensors(checkpoint_uri, verify=verify)
        saved = tensors.entries("model.")
        with torch.device("meta"):
            wanted = JoyAIFlash(cfg).state_dict()
        sources = {}
        for key, value in wanted.items():
            found = saved.get("model." + key)
            if found is None or tuple(found[0]) != tuple(value.shape):
                writer.abort()
                raise StoreConfigError(
                    f"{checkpoint_uri} does not hold model tensor {key} {tuple(value.shape)} (found "
                    f"{None if found is None else tuple(found[0])}): the manifest's model_config does not match "
                    "the saved weights")
            sources[key] = (tuple(found[0]), found[1])
        try:
            report = write_export(cfg, sources, lambda key: tensors.read("model." + key), writer.open, writer.put,
                                  tokenizer=tokenizer or TOKENIZER_FILE, int4_group_size=group_size,
                                  max_file_bytes=max_file_bytes or MAX_FILE_BYTES,
                                  progress=lambda msg: log.debug("export %s: %s", name, msg))
            ref = writer.commit({"checkpoint": checkpoint_uri, "step": step, "format": "hf-deepseek-v3",
                                 **({"int4": report} if report else {})})
        except BaseException:
            writer.abort()
            raise
        uri, manifest = ref.uri, ref.manifest_hash
    if lineage:
        ckpt_id = lineage.find(checkpoint_uri)
        lineage.add_model(ckpt_id, uri, name, version, "int4" if qat else "none", manifest)
    return uri
