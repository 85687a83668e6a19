"""The trainer's entry point, torchrun-compatible (what the operator's pods run):

    torchrun --nnodes 1 --nproc-per-node 2 -m flashops.trainers --spec examples/pretrain.yaml
    python -m flashops.trainers --spec examples/sft.yaml [--log-dir DIR]

The spec file holds one TrainingRun (or a TrainingPipeline, run stage by stage). Checkpoints go to
spec.checkpoint.uri (default file://$FLASHOPS_HOME/store); the run resumes from its latest complete
checkpoint. Lineage: $FLASHOPS_LINEAGE_URL (else SQLite in $FLASHOPS_HOME); with FLASHOPS_LINEAGE_RUN_ID
the checkpoints are added to that run (the operator started it). FLASHOPS_RUN_NAME overrides the run's
name (the store key). Exit codes: 0 done, 2 bad spec or data (retrying cannot help), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashops.trainers", description="Run a TrainingRun or TrainingPipeline.")
    p.add_argument("--spec", required=True, help="YAML file with a TrainingRun or TrainingPipeline")
    p.add_argument("--log-dir", default=None, help="write metrics.jsonl here (rank 0)")
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip the serving export (<store>/models/<run>/step-<n>) written when the run finishes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from flashops.api.spec import SpecError, TrainingPipeline, TrainingRun, load_file
    from flashops.trainers.errors import TrainerError

    try:
        objs = [o for o in load_file(args.spec) if isinstance(o, (TrainingRun, TrainingPipeline))]
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(objs) != 1:
        print(f"error: {args.spec} holds {len(objs)} TrainingRun/TrainingPipeline objects; the trainer runs exactly one",
              file=sys.stderr)
        return 2
    obj = objs[0]
    rank = int(os.environ.get("RANK", "0"))
    try:
        from flashops.trainers.runner import run_pipeline, run_training

        if isinstance(obj, TrainingPipeline):
            results, model_uri = run_pipeline(obj, log_root=args.log_dir, lineage=_lineage(rank))
            summary = {"stages": [r.checkpoint_uri for r in results], "model": model_uri}
        else:
            if os.environ.get("FLASHOPS_RUN_NAME"):
                obj.metadata.name = os.environ["FLASHOPS_RUN_NAME"]
            lineage = _lineage(rank)
            result = run_training(obj, lineage=lineage, log_dir=args.log_dir)
            summary = {"run": result.run, "steps": result.steps, "checkpoint": result.checkpoint_uri,
                       "loss": result.metrics.get("loss")}
            _leave_process_group()  # the export below reads the whole checkpoint in one process
            if args.export and rank == 0 and result.checkpoint_uri:
                summary["model"] = _export(obj, result.checkpoint_uri, lineage)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(summary))
    return 0


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _export(run, checkpoint_uri: str, lineage) -> str:
    """The serving export of the final checkpoint, at the URI the operator gives the predictor
    (flashops.storage.exported_model_uri), recorded in lineage."""
    from flashops.storage import open_store, split_checkpoint_uri
    from flashops.trainers.runner import export_model

    root, name, step = split_checkpoint_uri(checkpoint_uri)
    return export_model(open_store(root), lineage or None, checkpoint_uri, name, f"step-{step}")


def _lineage(rank: int):
    """Only rank 0 records lineage; False switches it off on the others."""
    if rank != 0:
        return False
    from flashops.api.lineage import open_lineage

    return open_lineage()


if __name__ == "__main__":
    sys.exit(main())
