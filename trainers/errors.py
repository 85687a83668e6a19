"""Typed trainer errors. Each names the field, the value and the fix; all are raised before compute starts
(`flashops run` turns them into exit code 2)."""
from __future__ import annotations


class TrainerError(Exception):
    """Base class of the errors the trainer raises on purpose."""


class SpecValueError(TrainerError, ValueError):
    """A spec value (or combination) the trainer cannot run; e.g. microBatchSize > batchSize."""


class DataError(TrainerError, ValueError):
    """Training data missing, unreadable, or of the wrong shape for the stage."""


class ResumeError(TrainerError):
    """A checkpoint exists but does not fit this run (another spec, model or world size)."""


class DivergedError(TrainerError):
    """A non-finite loss or gradient norm: the run stops before the optimizer applies it, and nothing after the
    last finite step is saved. Deterministic for the spec (a retry diverges again), hence a TrainerError."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
