"""The trainer's entry point, torchrun-compatible (what the operator's pods run):

    torchrun --nnodes 1 --nproc-per-node 2 -m flashops.trainers --spec examples/pretrain.yaml
    python -m flashops.trainers --spec examples/sft.yaml [--log-dir DIR]

The spec file holds one TrainingRun (or a TrainingPipeline, run stage by stage). Checkpoints go to
spec.checkpoint.uri (default file://$FLASHOPS_HOME/store); the run resumes from its latest complete
checkpoint. Lineage: $FLASHOPS_LINEAGE_URL (else SQLite in $FLASHOPS_HOME); with FLASHOPS_LINEAGE_RUN_ID
the checkpoints are added to that run (the operator started it). FLASHOPS_RUN_NAME overrides the run's
name (the store key). Exit codes (flashops.api.failures): 0 done, 2 bad spec or data (retrying cannot help),
1 anything else. Inside a pod, rank 0 also writes why to the termination message (/dev/termination-log), since
torchrun reports every child's failure as its own exit code 1; the operator reads it to tell 2 from 1.
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
                   help="skip the serving export written when the run finishes (a standalone run or a pipeline's "
                        "final stage; <store>/models/<pipeline or run>/step-<n>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from flashops.api.failures import EXIT_FAILED, EXIT_INVALID_SPEC
    from flashops.api.spec import SpecError, TrainingPipeline, TrainingRun, load_file
    from flashops.trainers.errors import TrainerError

    rank = int(os.environ.get("RANK", "0"))
    try:
        objs = [o for o in load_file(args.spec) if isinstance(o, (TrainingRun, TrainingPipeline))]
    except SpecError as e:
        return _fail(rank, EXIT_INVALID_SPEC, str(e))
    if len(objs) != 1:
        return _fail(rank, EXIT_INVALID_SPEC,
                     f"{args.spec} holds {len(objs)} TrainingRun/TrainingPipeline objects; the trainer runs exactly one")
    obj = objs[0]
    try:
        from flashops.trainers.runner import run_pipeline, run_training

        if isinstance(obj, TrainingPipeline):
            results, model_uri = run_pipeline(obj, log_root=args.log_dir, lineage=_lineage(rank),
                                              export=args.export and rank == 0)
            summary = {"stages": [r.checkpoint_uri for r in results], "model": model_uri,
                       "runs": [run_summary(r) for r in results]}
        else:
            if os.environ.get("FLASHOPS_RUN_NAME"):
                obj.metadata.name = os.environ["FLASHOPS_RUN_NAME"]
            lineage = _lineage(rank)
            result = run_training(obj, lineage=lineage, log_dir=args.log_dir)
            summary = run_summary(result)
            _leave_process_group()  # the export below reads the whole checkpoint in one process
            if args.export and rank == 0:
                from flashops.trainers.runner import export_finished_run

                # only a standalone run or a pipeline's final stage exports (flashops.api.pipeline.exports)
                summary["model"] = export_finished_run(obj, result.checkpoint_uri, None, lineage)
    except TrainerError as e:
        return _fail(rank, EXIT_INVALID_SPEC, str(e))
    except Exception as e:
        _fail(rank, EXIT_FAILED, f"{type(e).__name__}: {e}")
        raise
    if rank == 0:
        print(json.dumps(summary))
    return 0


def run_summary(result) -> dict:
    """What the trainer prints of a finished run (alone, or each of a pipeline's under "runs")."""
    return {"run": result.run, "stage": result.stage, "steps": result.steps, "checkpoint": result.checkpoint_uri,
            "loss": result.metrics.get("loss"), "device": result.device}


def _fail(rank: int, code: int, message: str) -> int:
    """Say why on stderr and, on rank 0 inside a pod, in the termination message the operator reads."""
    from flashops.api.failures import write_termination_message

    print(f"error: {message}", file=sys.stderr)
    if rank == 0:
        write_termination_message(code, message)
    return code


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _lineage(rank: int):
    """Only rank 0 records lineage; False switches it off on the others."""
    if rank != 0:
        return False
    from flashops.api.lineage import open_lineage

    return open_lineage()


if __name__ == "__main__":
    sys.exit(main())
