"""Status that says why: conditions from a state, and our state from a child's status. Pure functions.

Every flashops object carries all of Accepted, Pending, Running, Succeeded, Failed, Suspended (plus Ready
for ModelDeployments), each True/False with a reason and a message, so `kubectl describe` always answers
"what is it doing and why". lastTransitionTime moves only when a condition's status flips.

    phase = pytorchjob_phase(job)          # Phase("Running", "JobRunning", "PyTorchJob ... is running")
    status["conditions"] = conditions_for(phase, accepted=True, previous=status.get("conditions"))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashops.api.spec import now_rfc3339

CONDITION_TYPES = ("Accepted", "Pending", "Running", "Succeeded", "Failed", "Suspended")
STATES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Phase:
    """Where an object (or its child) is: one of STATES, a CamelCase reason, a sentence for people."""

    state: str
    reason: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state {self.state!r} is not one of {STATES}")


def conditions_for(phase: Phase, accepted: bool = True, previous: list[dict] | None = None,
                   ready: bool | None = None, now: str | None = None) -> list[dict]:
    """The full condition list for `phase`. Accepted=False means the spec was rejected (phase says why)."""
    now = now or now_rfc3339()
    old = {c.get("type"): c for c in previous or []}
    out = []
    types = CONDITION_TYPES + (("Ready",) if ready is not None else ())
    for t in types:
        if t == "Accepted":
            status = accepted
            reason, message = ("SpecValid", "the spec is valid") if accepted else (phase.reason, phase.message)
        elif t == "Ready":
            status = bool(ready)
            reason, message = phase.reason, phase.message
        else:
            status = phase.state == t
            reason, message = (phase.reason, phase.message) if status else ("", "")
        s = "True" if status else "False"
        prev = old.get(t)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == s and prev.get("lastTransitionTime") else now
        out.append({"type": t, "status": s, "reason": reason, "message": message, "lastTransitionTime": since})
    return out


def same_status(a: dict | None, b: dict | None) -> bool:
    """Equal apart from condition timestamps: a write that changes nothing is skipped."""
    def strip(s: dict | None) -> dict:
        s = dict(s or {})
        s.pop("kopf", None)
        s["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]
        return s

    return strip(a) == strip(b)


def _true_conditions(status: dict | None) -> dict[str, dict]:
    return {c.get("type"): c for c in (status or {}).get("conditions") or [] if c.get("status") == "True"}


def pytorchjob_phase(job: dict) -> Phase:
    """Kubeflow training operator v1 job conditions (Created, Running, Restarting, Succeeded, Failed, Suspended)."""
    name = job["metadata"]["name"]
    true = _true_conditions(job.get("status"))
    for t, state in (("Succeeded", "Succeeded"), ("Failed", "Failed"), ("Suspended", "Suspended"),
                     ("Running", "Running"), ("Restarting", "Running")):
        if t in true:
            c = true[t]
            return Phase(state, c.get("reason") or f"Job{t}", c.get("message") or f"PyTorchJob {name} is {t.lower()}")
    if (job.get("spec", {}).get("runPolicy") or {}).get("suspend"):
        return Phase("Suspended", "JobSuspended", f"PyTorchJob {name} is suspended")
    if "Created" in true:
        return Phase("Pending", "JobCreated", f"PyTorchJob {name} is created; waiting for its pods to run")
    return Phase("Pending", "JobSubmitted", f"PyTorchJob {name} is submitted; waiting for the training operator")


def trainjob_phase(job: dict) -> Phase:
    """Kubeflow Trainer v2 TrainJob conditions (Complete, Failed, Suspended) and jobsStatus for Running."""
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    true = _true_conditions(status)
    for t, state in (("Complete", "Succeeded"), ("Failed", "Failed"), ("Suspended", "Suspended")):
        if t in true:
            c = true[t]
            return Phase(state, c.get("reason") or f"TrainJob{t}", c.get("message") or f"TrainJob {name}: {t.lower()}")
    if (job.get("spec") or {}).get("suspend"):
        return Phase("Suspended", "TrainJobSuspended", f"TrainJob {name} is suspended")
    if any((js.get("active") or 0) > 0 for js in status.get("jobsStatus") or []):
        return Phase("Running", "TrainJobRunning", f"TrainJob {name} is running")
    return Phase("Pending", "TrainJobCreated", f"TrainJob {name} is created; waiting for its pods to run")


def inference_service_phase(isvc: dict) -> tuple[Phase, bool]:
    """KServe: Ready=True means serving; otherwise say which part is not ready and why."""
    name = isvc["metadata"]["name"]
    conds = {c.get("type"): c for c in (isvc.get("status") or {}).get("conditions") or []}
    ready = conds.get("Ready")
    if ready and ready.get("status") == "True":
        url = (isvc.get("status") or {}).get("url", "")
        return Phase("Running", "InferenceServiceReady", f"InferenceService {name} is serving at {url}".strip()), True
    failing = [c for t, c in conds.items() if t != "Ready" and c.get("status") == "False"]
    if ready and ready.get("status") == "False" and (failing or ready.get("reason")):
        c = failing[0] if failing else ready
        what = c.get("type", "Ready")
        msg = c.get("message") or c.get("reason") or "not ready"
        if c.get("severity") != "Info" and c.get("reason") in ("RevisionFailed", "RevisionMissing", "ContainerMissing"):
            return Phase("Failed", c.get("reason"), f"InferenceService {name}: {what}: {msg}"), False
        return Phase("Pending", c.get("reason") or f"{what}NotReady", f"InferenceService {name}: {what}: {msg}"), False
    return Phase("Pending", "InferenceServiceCreated", f"InferenceService {name} is created; waiting for KServe"), False


def job_phase(job: dict) -> Phase:
    return trainjob_phase(job) if job.get("kind") == "TrainJob" else pytorchjob_phase(job)
