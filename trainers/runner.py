"""Run a TrainingRun or a whole TrainingPipeline in this process (the embedded default of `flashops run`):
checkpoints in the store (default file://$FLASHOPS_HOME/store), lineage in SQLite ($FLASHOPS_HOME/lineage.db).

    from flashops.trainers import run_training, run_pipeline
    result = run_training(run)                        # RunResult(checkpoint_uri, metrics, ...)
    results, model = run_pipeline(pipeline)           # stage by stage, each from the previous checkpoint

Every stage is preflighted before it starts, and a pipeline preflights what it can of all stages (spec
values, data) before the first one runs, so a typo in the last stage fails in seconds, not after an hour.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from flashops.api.spec import TrainingPipeline, TrainingRun, pipeline_stage_run
from flashops.trainers.engine import RunResult, Trainer

log = logging.getLogger("flashops.trainers")


def _open_defaults(store, lineage):
    if store is None or isinstance(store, str):
        from flashops.storage import open_store

        store = open_store(store)
    if lineage is None:
        from flashops.api.lineage import open_lineage

        lineage = open_lineage()
    elif lineage is False:
        lineage = None
    return store, lineage


def run_training(run: TrainingRun, store=None, lineage=None, *, on_step: Callable[[dict], None] | None = None,
                 log_dir: str | Path | None = None, crash_after: int | None = None) -> RunResult:
    """Train one run to completion (resuming from its latest checkpoint). store: a CheckpointStore, a URI or
    None (run.spec.checkpoint.uri, else the default); lineage: a Lineage, None (the default) or False (off)."""
    store, lineage = _open_defaults(store if store is not None else run.spec.checkpoint.uri, lineage)
    trainer = Trainer(run, store=store, lineage=lineage, on_step=on_step, log_dir=log_dir, crash_after=crash_after)
    trainer.preflight()
    return trainer.fit()


def preflight_pipeline(pipeline: TrainingPipeline, store=None, lineage=None) -> None:
    """Check every stage's spec and data before the first one runs (initFrom of later stages is the
    previous stage's output, so it is checked when that stage starts)."""
    from flashops.trainers import checks

    for i, stage in enumerate(pipeline.spec.stages):
        run = pipeline_stage_run(pipeline, i, None)
        checks.preflight(run, store, lineage, check_init=i == 0 or run.spec.init_from is not None)


def run_pipeline(pipeline: TrainingPipeline, store=None, lineage=None, *,
                 on_stage: Callable[[int, TrainingRun], None] | None = None,
                 on_step: Callable[[dict], None] | None = None, log_root: str | Path | None = None,
                 export: bool = True) -> tuple[list[RunResult], str | None]:
    """Run the stages in order; returns their results and the exported model URI (None if export=False)."""
    store, lineage = _open_defaults(store, lineage)
    preflight_pipeline(pipeline, store, lineage)
    results: list[RunResult] = []
    prev = None
    for i in range(len(pipeline.spec.stages)):
        run = pipeline_stage_run(pipeline, i, prev)
        if on_stage:
            on_stage(i, run)
        log_dir = Path(log_root) / run.metadata.name if log_root else None
        result = run_training(run, store, lineage or False, on_step=on_step, log_dir=log_dir)
        results.append(result)
        prev = result.checkpoint_uri
    model_uri = export_model(store, lineage, prev, pipeline.metadata.name) if export and prev else None
    return results, model_uri


def export_model(store, lineage, checkpoint_uri: str, name: str, version: str | None = None) -> str:
    """Write the checkpoint's model as a serving export (config.json, model.safetensors, tokenizer.json,
    plus model-int4.safetensors + int4.json when the run used QAT) and record it in lineage."""
    from safetensors.torch import save_file

    from flashops.model import JoyAIFlash
    from flashops.model.config import JoyAIConfig
    from flashops.model.tokenizer import TOKENIZER_FILE
    from flashops.storage import AlreadyExistsError, load_checkpoint, open_store, split_checkpoint_uri

    root, _, step = split_checkpoint_uri(checkpoint_uri)
    meta = open_store(root).meta(checkpoint_uri)
    cfg = JoyAIConfig.from_dict(meta.model_config)
    version = version or f"step-{step}"
    model = JoyAIFlash(cfg)
    state = {"model": model.state_dict()}
    load_checkpoint(checkpoint_uri, state)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg.to_dict()))
        files = {"model.safetensors": d / "model.safetensors", "config.json": d / "config.json",
                 "tokenizer.json": TOKENIZER_FILE}
        qat = (meta.extra or {}).get("qat") == "int4"
        if qat:
            from flashops.model.export import save_int4

            report = save_int4(d / "model-int4.safetensors", model)
            (d / "int4.json").write_text(json.dumps({k: v for k, v in report.items() if k != "per_tensor"}))
            files.update({"model-int4.safetensors": d / "model-int4.safetensors", "int4.json": d / "int4.json"})
        try:
            ref = store.export_model(name, version, files, {"checkpoint": checkpoint_uri, "step": step})
            uri, manifest = ref.uri, ref.manifest_hash
        except AlreadyExistsError:
            uri = store.model_uri(name, version)
            manifest = store.model_manifest(uri)["manifest_sha256"]
    if lineage:
        ckpt_id = lineage.find(checkpoint_uri)
        lineage.add_model(ckpt_id, uri, name, version, "int4" if qat else "none", manifest)
    return uri
