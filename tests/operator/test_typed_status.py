"""The operator writes status only through the typed model (issue 13, typed seams): flashops.api.spec.ObjectStatus
is what the CRD's status schema is generated from, so a field it does not know is refused before it reaches the
API server (where the status schema preserves unknown fields, so a typo would be stored silently)."""
from __future__ import annotations

import pydantic
import pytest

from flashops.api import spec as S
from flashops.operator.reconcile import TRAININGRUN, typed_status, write_status

KNOWN = {"state": "Running", "retries": 1, "retryReason": "the previous attempt ran out of memory",
         "resumedFrom": "file:///store/checkpoints/a/step-10", "modelUri": "file:///store/models/a/step-20",
         "latestCheckpoint": "file:///store/checkpoints/a/step-20", "lineageId": "run-1", "lineageClosed": True,
         "appliedGeneration": 3, "appliedSpecHash": "abc", "specChange": "training.steps: 20 -> 40",
         "observedGeneration": 3, "mtpTokens": 2, "mtpChoice": "k=2: 1.6x expected",
         "canaryModel": "file:///store/models/b/step-5", "stage": "sft", "url": "http://svc"}
KOPF = {"progress": {"flashops-training-run": {"started": "2025-01-01T00:00:00", "retries": 2}}}


def test_known_fields_and_kopfs_own_key_pass_through_unchanged():
    status = {**KNOWN, "kopf": KOPF}
    assert typed_status(status) == status


def test_every_field_of_the_model_passes_under_its_camel_case_name():
    every = {f.alias: None for f in S.ObjectStatus.model_fields.values()}
    every.update(conditions=[], children=[], stages=[], retries=0)
    out = typed_status(every)
    assert set(out) == set(every)


@pytest.mark.parametrize("field", ["retryReasn", "resumed", "modelURI", "exportUri", "retry_reason", "model_uri"])
def test_a_field_not_in_the_model_is_refused_by_name(field):
    """A misspelling, an invented field, or the Python (snake_case) name of a real one: none is in the CRD schema."""
    with pytest.raises(TypeError, match=field) as e:
        typed_status({"state": "Running", "kopf": KOPF, field: "x"})
    assert "ObjectStatus" in str(e.value) and "kopf" not in str(e.value)


def test_a_mistyped_known_field_is_refused():
    with pytest.raises(pydantic.ValidationError, match="retries"):
        typed_status({"retries": "many"})


def test_write_status_checks_before_it_patches():
    class Kube:
        def __init__(self):
            self.patches = []

        def patch(self, *args, **kwargs):
            self.patches.append((args, kwargs))

    kube = Kube()
    body = {"kind": "TrainingRun", "metadata": {"name": "a", "namespace": "ml"}, "status": {"state": "Pending"}}
    with pytest.raises(TypeError, match="retryReasn"):
        write_status(kube, TRAININGRUN, body, {"state": "Running", "retryReasn": "OOM"})
    assert kube.patches == []
