"""Shared test data: the tokens the test server accepts and a small recorded pipeline."""
from sqlalchemy import func, select

from flashops.api.lineage.models import Edge, Node

READER, WRITER = "reader-token-123", "writer-token-456"
TOKENS = {READER: frozenset({"read"}), WRITER: frozenset({"read", "write"})}
SPEC = {"stage": "pretrain", "training": {"steps": 200}}


def counts(lin):
    with lin.engine.connect() as c:
        return (c.scalar(select(func.count()).select_from(Node)), c.scalar(select(func.count()).select_from(Edge)))


def record_pipeline(lin, pipeline="quickstart"):
    """What `flashops run -f quickstart.yaml` records: two stages, the second starting from the first."""
    ds = lin.upsert_dataset("builtin:pretrain-text", content_hash="sha256:aa", version="1")
    pre = lin.start_run(f"{pipeline}-pretrain", "TrainingRun", "pretrain", SPEC, "sha256:pre",
                        consumed=[ds], pipeline=pipeline)
    lin.add_checkpoint(pre, f"file:///s/{pipeline}-pretrain/step-100", 100, "sha256:m1", {"loss": 3.0})
    ck = lin.add_checkpoint(pre, f"file:///s/{pipeline}-pretrain/step-200", 200, "sha256:m2", {"loss": 2.0})
    lin.finish_run(pre, "succeeded", {"loss": 2.0})
    sft = lin.start_run(f"{pipeline}-sft", "TrainingRun", "sft", {**SPEC, "stage": "sft"}, "sha256:sft",
                        consumed=["builtin:sft-chat"], initialized_from=ck, pipeline=pipeline)
    final = lin.add_checkpoint(sft, f"file:///s/{pipeline}-sft/step-50", 50, "sha256:m3", {"loss": 1.5})
    lin.finish_run(sft, "Completed", {"loss": 1.5})
    return dict(ds=ds, pre=pre, ck=ck, sft=sft, final=final)
