"""Kubernetes Events for the decisions a user needs to see in `kubectl describe` (and `kubectl get events`).

kopf 1.45 posts no Events of its own unless told to, so `kubectl describe` said `Events: <none>` even after a
permanent failure. The operator now posts a core/v1 Event for each decision, derived from the status change it
is about to write (so a decision is announced once, also across operator restarts: the old status is stored):

| reason | type | when |
| --- | --- | --- |
| `Created` | Normal | a child (PyTorchJob, TrainJob, InferenceService, a pipeline's TrainingRun) appears in status.children |
| `Retrying` | Warning | status.retries grew: the message is the retry's cause (the failed attempt and where it resumes) |
| `StageAdvanced` | Normal | a pipeline's current stage changed |
| `PromotionBlocked` | Warning | a ModelDeployment cannot roll out its model: the source is not finished, failed or not found, or its recorded evaluation fails spec.promotion (condition PromotionBlocked: the numbers) |
| `Promoted` | Normal | a new model passed spec.promotion and is rolled out (to the canary share with canaryTrafficPercent) |
| `SpecRejected` | Warning | an edit of a running object was refused (Accepted=False; the child keeps running) |
| `SpecChangeDeferred` | Normal | a running run's training spec was edited: it applies from the next attempt |
| the Failed reason (`BackoffLimitExceeded`, `InvalidSpec`, `ChildRejected`, `StageFailed`...) | Warning | the object failed |
| `Succeeded` | Normal | the object succeeded |

    events = status_events("TrainingRun", old_status, new_status)     # pure: [Event("Warning", "Retrying", ...)]
    post_events(kube, body, events)                                   # never raises: Events are best-effort

Posting needs `create` on core/v1 events (helm/flashops/templates/operator-rbac.yaml).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from flashops.api.spec import now_rfc3339

log = logging.getLogger("flashops.operator")
COMPONENT = "flashops-operator"
MESSAGE_LIMIT = 1024  # the API server refuses longer Event messages
TERMINAL = ("Succeeded", "Failed")
# A ModelDeployment's Pending/Failed reasons that mean "the model cannot be rolled out (promoted) yet".
PROMOTION_BLOCKED = ("WaitingForModel", "SourceNotFound", "SourceFailed", "LineageUnavailable", "LineageRefused")


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str  # CamelCase, what `kubectl describe` shows in the Reason column
    message: str


def _active(status: dict) -> dict:
    """The condition that says what the object is doing now (the one named after its state)."""
    state = status.get("state")
    return next((c for c in status.get("conditions") or [] if c.get("type") == state and c.get("status") == "True"), {})


def _accepted(status: dict) -> bool:
    return next((c.get("status") != "False" for c in status.get("conditions") or [] if c.get("type") == "Accepted"), True)


def status_events(kind: str, old: dict | None, new: dict) -> list[Event]:
    """The Events a status change announces (none when nothing a user needs to know changed)."""
    old = old or {}
    events: list[Event] = []
    seen = {(c.get("kind"), c.get("name")) for c in old.get("children") or []}
    for child in new.get("children") or []:
        if child.get("kind") != "ConfigMap" and (child.get("kind"), child.get("name")) not in seen:
            events.append(Event("Normal", "Created", f"created {child.get('kind')} {child.get('name')}"))
    if new.get("specChange") and new.get("specChange") != old.get("specChange"):
        events.append(Event("Normal", "SpecChangeDeferred", new["specChange"]))
    if int(new.get("retries") or 0) > int(old.get("retries") or 0):
        events.append(Event("Warning", "Retrying", new.get("retryReason") or f"retry {new.get('retries')}"))
    if kind == "TrainingPipeline" and new.get("stage") != old.get("stage") and new.get("state") not in TERMINAL:
        events.append(Event("Normal", "StageAdvanced", _active(new).get("message") or f"stage {new.get('stage')}"))
    if _accepted(old) and not _accepted(new) and new.get("state") != "Failed":
        message = next((c.get("message", "") for c in new.get("conditions") or [] if c.get("type") == "Accepted"), "")
        events.append(Event("Warning", "SpecRejected", message))
    active, old_active = _active(new), _active(old)
    changed = (new.get("state"), active.get("reason")) != (old.get("state"), old_active.get("reason"))
    if kind == "ModelDeployment":
        events += _promotion_events(old, new)
    if kind == "ModelDeployment" and active.get("reason") in PROMOTION_BLOCKED:
        if changed:
            events.append(Event("Warning", "PromotionBlocked", active.get("message", "")))
    elif new.get("state") == "Failed" and changed:
        events.append(Event("Warning", active.get("reason") or "Failed", active.get("message", "")))
    elif new.get("state") == "Succeeded" and old.get("state") != "Succeeded":
        events.append(Event("Normal", "Succeeded", active.get("message", "")))
    return events


def _condition(status: dict, ctype: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), {})


def _promotion_events(old: dict, new: dict) -> list[Event]:
    """The gate's decisions (flashops.operator.rollout): blocked (once per candidate and numbers), promoted (once)."""
    events = []
    gate, was = _condition(new, "PromotionBlocked"), _condition(old, "PromotionBlocked")
    if gate.get("status") == "True" and (was.get("status") != "True" or was.get("message") != gate.get("message")):
        events.append(Event("Warning", "PromotionBlocked", gate.get("message", "")))
    promo, before = new.get("promotion") or {}, old.get("promotion") or {}
    if promo.get("passed") and new.get("latestCheckpoint") == promo.get("candidate") and \
            (before.get("candidate"), before.get("passed")) != (promo.get("candidate"), True):
        canary = f" (canary: {new['canaryModel']} gets the canaryTrafficPercent share)" if new.get("canaryModel") else ""
        events.append(Event("Normal", "Promoted", promo.get("message", "") + canary))
    return events


def event_body(body: dict, event: Event, now: str | None = None) -> dict[str, Any]:
    """A core/v1 Event about `body` (what `kubectl describe` lists for it)."""
    meta = body["metadata"]
    now = now or now_rfc3339()
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace") or "default"},
        "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta["name"],
                           "namespace": meta.get("namespace") or "default", "uid": meta.get("uid")},
        "type": event.type, "reason": event.reason, "action": event.reason,
        "message": event.message if len(event.message) <= MESSAGE_LIMIT else event.message[: MESSAGE_LIMIT - 3] + "...",
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


def post_events(kube: Any, body: dict, events: list[Event]) -> None:
    """Post each Event; a refused or failed post is logged, never raised (the decision itself is in status)."""
    from flashops.operator.kube import ApiError

    for event in events:
        try:
            kube.create(event_body(body, event), "events")
        except ApiError as e:
            log.warning("could not post the %s event for %s/%s: %s", event.reason, body.get("kind"),
                        body["metadata"].get("name"), e)
