"""The stage registry (torchtitan's pattern): a stage name -> its class. The engine looks stages up here, so
stages.py and rl.py never import each other in a circle (rl builds on stages; only this module sees both).

    from flashops.trainers.registry import STAGES, make_stage
    stage = make_stage(trainer)          # STAGES[trainer.spec.stage](StageContext(trainer))
"""
from __future__ import annotations

from flashops.trainers.rl import RLStage
from flashops.trainers.stages import Stage, StageContext, supervised_stages

STAGES: dict[str, type[Stage]] = {**supervised_stages(), "rl": RLStage}


def make_stage(trainer) -> Stage:
    """The run's stage, given only the narrow StageContext of the trainer."""
    return STAGES[trainer.spec.stage](StageContext(trainer))
