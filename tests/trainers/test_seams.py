"""The trainer's typed seams: stages come from one registry (no stages <-> rl import circle) and get a narrow
context; lineage off is a NullLineage, not None/False."""
import ast
from pathlib import Path

import pytest

from flashops.api.lineage import NotFound, NullLineage, as_lineage
from flashops.api.spec import STAGES as SPEC_STAGES
from flashops.trainers.registry import STAGES
from flashops.trainers.stages import StageContext

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_every_spec_stage_is_registered_and_stages_do_not_import_rl():
    assert set(STAGES) == set(SPEC_STAGES)
    assert "flashops.trainers.rl" not in _imports(ROOT / "trainers" / "stages.py")
    assert "flashops.trainers.registry" not in _imports(ROOT / "trainers" / "rl.py")


def test_a_stage_sees_the_context_not_the_trainer():
    public = {n for n in vars(StageContext) if not n.startswith("_")} | {"spec", "plan", "backward", "optimizer_step",
                                                                        "all_sum", "all_min", "frozen_reference"}
    assert public == {"spec", "plan", "model", "dist", "device", "backward", "optimizer_step", "all_sum", "all_min",
                      "frozen_reference"}


def test_null_lineage_records_nothing_and_knows_nothing():
    off = NullLineage()
    assert not off and as_lineage(None).__class__ is NullLineage and as_lineage(False).__class__ is NullLineage
    assert off.start_run("r", "TrainingRun", "sft", {}, "sha256:x") is None
    assert off.add_checkpoint(None, "file:///s/runs/r/step-1", 1) is None
    with pytest.raises(NotFound, match="lineage is off"):
        off.resolve("r")
