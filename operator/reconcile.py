"""Level-triggered reconcilers: read the object and its children, decide, act, write a status that says why.

    outcome = reconcile_training_run(kube, ext, config, "default", "pretrain-a")
    outcome.retry_after    # seconds -> the kopf handler raises TemporaryError; None -> done for now
    outcome.permanent      # message -> PermanentError (the spec must change first)

Each reconciler re-reads the object (never trusts a stale event body), so it is safe to call from any
trigger (create/update/resume, a child's event, a timer, an operator restart) and any number of times:
children have deterministic names and creation treats AlreadyExists as "already done", so no trigger
ever produces a duplicate. Retries are counted in status.retries and written BEFORE the next child is
created, so an operator restart can neither reset nor double-spend the budget.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any

from flashops.api import spec as S
from flashops.api.failures import TrainerFailure, trainer_failure
from flashops.api.references import UnresolvedReference, is_uri, resolve_reference
from flashops.api.pipeline import (LABEL_FINAL_STAGE, LABEL_PIPELINE, EvaluationJob, StageOutcome, advance, export_location,
                                   export_name, exports)
from flashops.api.loader import SpecError, check_architecture, parse_object
from flashops.operator import children as C
from flashops.operator.config import OperatorConfig
from flashops.operator.events import post_events, status_events
from flashops.operator.inference import INFERENCESERVICE, MODEL_URI_ANNOTATION, build_inference_service, isvc_name
from flashops.operator.integrations import Integrations, LineageDown, LineageProblem
from flashops.operator.kube import ApiError, Kube
from flashops.operator.rollout import canary_note, plan_rollout, promotion_condition
from flashops.operator.status import TERMINAL, Phase, conditions_for, inference_service_phase, job_phase, same_status

log = logging.getLogger("flashops.operator")

RESOURCES = {kind: (S.API_GROUP_VERSION, plural, kind) for kind, plural in S.PLURALS.items()}  # the one kind table
TRAININGRUN, TRAININGPIPELINE, MODELDEPLOYMENT = (RESOURCES[k] for k in ("TrainingRun", "TrainingPipeline",
                                                                         "ModelDeployment"))
CRD_MISSING_RETRY = 30.0
OPTIONAL_PREDICTOR_FIELDS = ("canaryTrafficPercent", "volumes")  # set by build_inference_service only when used
ROLLOUT_FIELDS = ("mtpTokens", "mtpChoice", "canaryModel")  # status a ModelDeployment may drop again


@dataclass
class Outcome:
    status: dict | None = None
    retry_after: float | None = None  # temporary trouble: try again after this many seconds
    permanent: str | None = None  # the spec is unusable until it changes
    reason: str = ""  # why a retry is needed (for the TemporaryError message)


class ChildError(Exception):
    """A child could not be created; `phase` is what the parent's status should say, `retry_after` if temporary."""

    def __init__(self, phase: Phase, retry_after: float | None):
        super().__init__(phase.message)
        self.phase, self.retry_after = phase, retry_after


# ----------------------------------------------------------------------------------------------- shared helpers


def _parse(body: dict) -> S.SpecObject:
    clean = {k: v for k, v in body.items() if k != "status"}
    source = f"{body.get('kind', '?')}/{body.get('metadata', {}).get('name', '?')}"
    return check_architecture(parse_object(clean, source=source), source)


def write_status(kube: Kube, res: tuple, body: dict, status: dict) -> dict:
    """Merge-patch the status subresource, skipping writes that would change nothing (no event storms), and
    post the Kubernetes Events the change announces (flashops.operator.events)."""
    status = typed_status(status)
    if same_status(body.get("status"), status):
        return status
    meta = body["metadata"]
    kube.patch(res[0], res[1], meta.get("namespace"), meta["name"], {"status": status}, subresource="status")
    post_events(kube, body, status_events(res[2], body.get("status"), status))
    return status


def typed_status(status: dict) -> dict:
    """The status through the typed model (flashops.api.spec.ObjectStatus): a misspelt or mistyped field fails
    here, in tests, instead of silently landing outside the CRD schema. kopf's own keys pass through."""
    checked = S.ObjectStatus.model_validate(status)
    # by the CRD's (camelCase) names: the model also accepts the Python names, which the schema does not have
    unknown = sorted(set(status) - {f.alias for f in S.ObjectStatus.model_fields.values()} - {"kopf"})
    if unknown:
        raise TypeError(f"status fields {unknown} are not in flashops.api.spec.ObjectStatus: add them there "
                        "(the CRD schema is generated from it)")
    return {**status, **checked.model_dump(by_alias=True, exclude_unset=True, mode="json")}


class DoesNotFit(Exception):
    """The run's per-rank memory exceeds resources.gpuMemory (flashops.api.plan): refused before any pod."""


def _check_fits(name: str, specs) -> None:
    from flashops.api.plan import fit_problem

    for where, spec in specs:
        problem = fit_problem(name, spec)
        if problem:
            raise DoesNotFit(f"{where}.{problem}")


def _invalid(kube: Kube, res: tuple, body: dict, message: str, reason: str = "InvalidSpec") -> Outcome:
    """A spec that cannot run: Accepted=False and, unless a child already runs, Failed, with the reason
    (InvalidSpec, or DoesNotFit when the plan says the run cannot fit its GPUs)."""
    old = body.get("status") or {}
    phase = Phase("Failed", reason, message)
    status = {**old, "observedGeneration": body["metadata"].get("generation")}
    if old.get("children") and old.get("state") not in (None, "Failed"):
        # An invalid update to a running object: the child keeps running; only Accepted flips.
        conds = [dict(c) for c in old.get("conditions") or []]
        for c in conds:
            if c.get("type") == "Accepted":
                c.update(status="False", reason=reason, message=message, lastTransitionTime=S.now_rfc3339())
        status["conditions"] = conds
    else:
        status.update(state="Failed", conditions=conditions_for(phase, accepted=False, previous=old.get("conditions")))
    write_status(kube, res, body, status)
    return Outcome(status=status, permanent=message)


def _create_child(kube: Kube, obj: dict, plural: str, config: OperatorConfig) -> dict:
    """Create (or find) a child; failures become a ChildError whose phase says why, in words."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    try:
        return kube.create(obj, plural)[0]
    except ApiError as e:
        if e.status == 404:
            group = obj["apiVersion"].split("/")[0]
            raise ChildError(Phase("Pending", "ChildKindMissing",
                                   f"cannot create {kind} {name}: the cluster does not serve {plural}.{group} "
                                   f"({obj['apiVersion']}); install its CRD and controller"
                                   + (" or set spec.runtime: trainjob" if kind == "PyTorchJob" else
                                      " or set spec.runtime: pytorchjob" if kind == "TrainJob" else "")),
                             max(CRD_MISSING_RETRY, config.retry_seconds)) from None
        if e.status in (400, 403, 422):
            raise ChildError(Phase("Failed" if e.status != 403 else "Pending",
                                   "ChildRejected" if e.status != 403 else "Forbidden",
                                   f"the API server rejected {kind} {name}: {e.message}"),
                             None if e.status != 403 else config.retry_seconds) from None
        raise ChildError(Phase("Pending", "ApiUnavailable", f"cannot create {kind} {name} yet: {e}"),
                         config.retry_seconds) from None


def _ref(obj: dict) -> dict:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "namespace": obj["metadata"].get("namespace")}


def _with_owner(obj: S.SpecObject, body: dict) -> S.SpecObject:
    """The parsed object with the server's uid/namespace (ownerReferences need the uid)."""
    obj.metadata.uid = body["metadata"].get("uid")
    obj.metadata.namespace = body["metadata"].get("namespace") or "default"
    return obj


# ----------------------------------------------------------------------------------------------- TrainingRun


def reconcile_training_run(kube: Kube, ext: Integrations, config: OperatorConfig, namespace: str, name: str) -> Outcome:
    body = kube.get(*TRAININGRUN[:2], namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome()
    try:
        run = _with_owner(_parse(body), body)
        if not isinstance(run, S.TrainingRun):
            raise SpecError([f"expected a TrainingRun, got {run.kind}"])
        job_api, job_plural, job_kind = C.job_kind(run, config)
        C.build_job(run, 0, config)  # settings problems (S3 endpoint, TLS) surface here, before anything exists
        _check_fits(name, [("spec", run.spec)])
    except (SpecError, C.InvalidObject) as e:
        return _invalid(kube, TRAININGRUN, body, str(e))
    except DoesNotFit as e:
        return _invalid(kube, TRAININGRUN, body, str(e), reason="DoesNotFit")

    old = body.get("status") or {}
    status: dict[str, Any] = copy.deepcopy(old)
    retries = int(old.get("retries") or 0)
    limit = run.spec.backoff_limit
    store_uri = C.checkpoint_uri(run, config)
    notes: list[str] = []
    retry_after: float | None = None

    # Lineage first, so the trainer gets its run id; if lineage is down the child still starts.
    lineage_id = old.get("lineageId")
    if ext.lineage_enabled and not lineage_id:
        try:
            lineage_id = status["lineageId"] = ext.start_run(run)
        except LineageDown as e:
            notes.append(f"lineage not recorded yet (will retry): {e}")
            retry_after = config.retry_seconds
        except LineageProblem as e:  # a permanent answer: the resync tries again, no fast retries
            notes.append(f"lineage did not record the run: {e}")

    def create_attempt(attempt: int) -> dict:
        cm = C.spec_configmap(run, config)
        existing_cm = kube.get("v1", "configmaps", namespace, cm["metadata"]["name"])
        if existing_cm is None:
            _create_child(kube, cm, "configmaps", config)
        elif existing_cm.get("data") != cm["data"]:
            kube.patch("v1", "configmaps", namespace, cm["metadata"]["name"], {"data": cm["data"]})
        # Which spec this attempt trains with: a later edit is reported (specChange) until an attempt takes it.
        status.update(appliedGeneration=body["metadata"].get("generation"), appliedSpecHash=S.spec_hash(cm["data"]))
        status.setdefault("startTime", S.now_rfc3339())
        return _create_child(kube, C.build_job(run, attempt, config, lineage_id), job_plural, config)

    child_name = C.child_name(name, retries)
    try:
        child = kube.get(job_api, job_plural, namespace, child_name)
        final = old.get("state") == "Succeeded" or (old.get("state") == "Failed" and (
            retries >= limit or _condition_reason(old, "Failed") == "InvalidSpec"))
        if child is None and final and old.get("children"):
            # The final child was removed by someone: the run stays as it ended; it never reruns by itself.
            state = old["state"]
            phase = Phase(state, _condition_reason(old, state) or state, _condition_message(old, state) or f"the run {state.lower()}")
        else:
            if child is None:
                child = create_attempt(retries)
            else:
                child = _sync_suspend(kube, child, run.spec.suspend)
            phase = job_phase(child)
            if phase.state == "Pending" and retries and status.get("retryReason"):
                # Keep saying why this attempt exists until it runs: the retry's cause, then the child's state.
                phase = Phase("Pending", "Retrying", f"{status['retryReason']}; {phase.message}")
            if run.spec.suspend and phase.state not in TERMINAL:
                phase = Phase("Suspended", "Suspended", f"{job_kind} {child_name} is suspended (spec.suspend: true); "
                              "set spec.suspend: false to resume from the latest checkpoint")
            refused = old.get("state") == "Failed" and _condition_reason(old, "Failed") == "InvalidSpec"
            failure = _attempt_failure(kube, namespace, name, retries) if phase.state == "Failed" and not refused else None
            if phase.state == "Failed" and refused:
                phase = Phase("Failed", "InvalidSpec", _condition_message(old, "Failed"))  # decided once; pods may be gone
            elif failure is not None and failure.permanent:
                # The trainer refused the spec or its data (exit 2): a retry would fail the same way.
                phase = Phase("Failed", failure.reason,
                              f"{job_kind} {child_name}: the trainer stopped with exit code {failure.exit_code} "
                              f"(no retry: fix the spec, then delete and re-apply the TrainingRun): {failure.message}")
            elif phase.state == "Failed" and retries < limit:
                failed = phase
                retries += 1
                latest = ext.latest_checkpoint(store_uri, name)
                resume = latest or f"the latest complete checkpoint under {store_uri} (none known yet)"
                why = f"{failed.reason}: {failed.message}" + (f"; trainer: {failure.message}" if failure else "")
                phase = Phase("Pending", "Retrying", f"{job_kind} {child_name} failed ({why}); "
                              f"retry {retries}/{limit} as {C.child_name(name, retries)} resumes from {resume}")
                status.update(retries=retries, resumedFrom=latest, retryReason=phase.message)
                if latest:
                    status["latestCheckpoint"] = latest
                # Persist the spent retry before the new child exists: a restart here cannot reset the budget.
                status.update(state=phase.state, conditions=conditions_for(phase, previous=old.get("conditions")))
                write_status(kube, TRAININGRUN, body, status)
                body = {**body, "status": copy.deepcopy(status)}
                child = create_attempt(retries)
                child_name = child["metadata"]["name"]
            elif phase.state == "Failed":
                phase = Phase("Failed", "BackoffLimitExceeded" if limit else phase.reason,
                              f"{job_kind} {child_name} failed ({phase.reason}: {phase.message})"
                              + (f"; all {limit} retries used (backoffLimit {limit})" if limit else ""))
            if phase.state == "Succeeded":
                latest = ext.latest_checkpoint(store_uri, name)
                if latest:
                    status["latestCheckpoint"] = latest
                    if exports(run):  # the trainer wrote its serving export there (same rule as flashops run)
                        status["modelUri"] = export_location(latest, export_name(run))
                elif ext.last_store_error:
                    notes.append(f"final checkpoint unknown: {ext.last_store_error}")
            if phase.state in TERMINAL:
                status.setdefault("completionTime", S.now_rfc3339())
            _delete_stale_attempts(kube, job_api, job_plural, namespace, name, keep=child_name)
            status["children"] = [_ref(C.spec_configmap(run, config)), _ref(child)]
    except ChildError as e:
        phase, retry_after = e.phase, e.retry_after or retry_after

    # Close the lineage record once the run is final.
    if phase.state in TERMINAL and lineage_id and not old.get("lineageClosed"):
        try:
            # why it ended goes with it (the dashboard shows a failed stage's condition reason and message)
            why = {} if phase.state == "Succeeded" else {"reason": phase.reason, "message": phase.message}
            ext.finish_run(lineage_id, phase.state.lower(), {"retries": retries, **why})
            status["lineageClosed"] = True
        except LineageDown as e:
            notes.append(f"lineage not closed yet (will retry): {e}")
            retry_after = retry_after or config.retry_seconds
        except LineageProblem as e:  # the record is gone or refuses this status: retrying cannot help
            notes.append(f"lineage did not close the run: {e}")
            status["lineageClosed"] = True

    change = _spec_change(run, config, status, body, phase, job_kind)
    if change:
        status["specChange"] = change
        notes.append(change)
    elif "specChange" in status:
        status["specChange"] = None  # a merge patch removes a field by setting it to null
    if notes:
        phase = Phase(phase.state, phase.reason, "; ".join([phase.message, *notes]))
    status.update(state=phase.state, stage=run.spec.stage, retries=retries,
                  observedGeneration=body["metadata"].get("generation"),
                  conditions=conditions_for(phase, previous=(body.get("status") or {}).get("conditions")))
    write_status(kube, TRAININGRUN, body, status)
    permanent = phase.message if phase.reason == "ChildRejected" else None
    return Outcome(status=status, retry_after=retry_after, permanent=permanent, reason=phase.message)


def _spec_change(run: S.TrainingRun, config: OperatorConfig, status: dict, body: dict, phase: Phase,
                 job_kind: str) -> str | None:
    """A live edit of the training spec (issue 17 item 8) is applied on the next attempt, never to the running
    one (its pods read the spec ConfigMap at start): say so until an attempt takes it. suspend and backoffLimit
    are not training fields; they act at once."""
    applied = status.get("appliedSpecHash")
    if not applied or applied == S.spec_hash(C.spec_configmap(run, config)["data"]):
        return None
    generation, running = body["metadata"].get("generation"), status.get("appliedGeneration")
    if phase.state in TERMINAL:
        return (f"spec generation {generation} was edited after the run finished (it ran generation {running}): "
                "a finished run never reruns; apply the spec under a new name to train with it")
    child = next((c["name"] for c in status.get("children") or [] if c.get("kind") != "ConfigMap"), "its job")
    return (f"spec generation {generation} changes the training spec: it applies from the next attempt (a retry); "
            f"the running {job_kind} {child} keeps training with generation {running}")


def _attempt_failure(kube: Kube, namespace: str, run_name: str, attempt: int) -> TrainerFailure | None:
    """Why the attempt's trainer stopped, from its pods' termination messages (a permanent reason first)."""
    failures = [f for pod in kube.list("v1", "pods", namespace, C.attempt_pod_selector(run_name, attempt))
                if (f := trainer_failure(pod)) is not None]
    failures.sort(key=lambda f: not f.permanent)
    return failures[0] if failures else None


def _condition_reason(status: dict, ctype: str) -> str:
    return next((c.get("reason", "") for c in status.get("conditions") or [] if c.get("type") == ctype), "")


def _condition_message(status: dict, ctype: str) -> str:
    return next((c.get("message", "") for c in status.get("conditions") or [] if c.get("type") == ctype), "")


def _suspend_patch(child: dict, suspend: bool) -> dict | None:
    if child["kind"] == "TrainJob":
        have = bool((child.get("spec") or {}).get("suspend"))
        return None if have == suspend else {"spec": {"suspend": suspend}}
    have = bool(((child.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
    return None if have == suspend else {"spec": {"runPolicy": {"suspend": suspend}}}


def _sync_suspend(kube: Kube, child: dict, suspend: bool) -> dict:
    """spec.suspend of the run -> the child's suspend flag (Kubeflow then stops or restarts the pods)."""
    patch = _suspend_patch(child, suspend)
    if patch is None:
        return child
    api, plural = (C.TRAINJOB if child["kind"] == "TrainJob" else C.PYTORCHJOB)[:2]
    return kube.patch(api, plural, child["metadata"].get("namespace"), child["metadata"]["name"], patch) or child


def _delete_stale_attempts(kube: Kube, api: str, plural: str, namespace: str, run_name: str, keep: str) -> None:
    """One child per run: older attempts are removed once their successor exists."""
    selector = f"{C.LABEL_OWNER_KIND}=TrainingRun,{C.LABEL_OWNER}={run_name}"
    for job in kube.list(api, plural, namespace, selector):
        if job["metadata"]["name"] != keep:
            kube.delete(api, plural, namespace, job["metadata"]["name"])


def delete_training_run(kube: Kube, ext: Integrations, config: OperatorConfig, body: dict, give_up_on_lineage: bool) -> None:
    """Finalizer: remove the jobs and the spec ConfigMap, close the lineage record. Raises LineageDown
    (the handler retries) unless `give_up_on_lineage`, so a dead lineage service cannot block deletion forever."""
    meta = body["metadata"]
    ns, name = meta.get("namespace"), meta["name"]
    selector = f"{C.LABEL_OWNER_KIND}=TrainingRun,{C.LABEL_OWNER}={name}"
    for api, plural, _ in (C.PYTORCHJOB, C.TRAINJOB, C.CONFIGMAP):
        for obj in kube.list(api, plural, ns, selector):
            kube.delete(api, plural, ns, obj["metadata"]["name"])
    status = body.get("status") or {}
    if status.get("lineageId") and not status.get("lineageClosed") and ext.lineage_enabled:
        try:
            ext.finish_run(status["lineageId"], "cancelled", {"retries": status.get("retries", 0)})
        except LineageDown:
            if not give_up_on_lineage:
                raise
            log.warning("TrainingRun %s/%s deleted without closing lineage run %s", ns, name, status["lineageId"])
        except LineageProblem as e:  # already closed, or gone: nothing to wait for
            log.info("TrainingRun %s/%s deleted; lineage run %s not cancelled: %s", ns, name, status["lineageId"], e)


# ----------------------------------------------------------------------------------------------- TrainingPipeline


def reconcile_training_pipeline(kube: Kube, ext: Integrations, config: OperatorConfig, namespace: str, name: str) -> Outcome:
    body = kube.get(*TRAININGPIPELINE[:2], namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome()
    try:
        pipeline = _with_owner(_parse(body), body)
        if not isinstance(pipeline, S.TrainingPipeline):
            raise SpecError([f"expected a TrainingPipeline, got {pipeline.kind}"])
        for i, st in enumerate(pipeline.spec.stages):  # every stage must be runnable before the first starts
            if st.is_eval:
                C.build_eval_job(S.pipeline_stage_run(pipeline, i, "-"), config, pipeline)
            else:
                C.build_job(_with_owner(S.pipeline_stage_run(pipeline, i, None), body), 0, config)
        _check_fits(name, [(f"spec.stages[{i}].spec", st.spec) for i, st in enumerate(pipeline.spec.stages)
                           if not st.is_eval])
    except (SpecError, C.InvalidObject) as e:
        return _invalid(kube, TRAININGPIPELINE, body, str(e))
    except DoesNotFit as e:
        return _invalid(kube, TRAININGPIPELINE, body, str(e), reason="DoesNotFit")

    old = body.get("status") or {}
    backend = ClusterBackend(kube, config, pipeline, namespace)
    state = advance(pipeline, backend)  # the one sequencing rule (flashops.api.pipeline), shared with `flashops run`
    stages: list[dict] = []
    phase: Phase | None = backend.phase  # set when creating the current stage's TrainingRun failed
    n_stages = len(pipeline.spec.stages)
    for view in state.stages:
        entry = {"name": view.name, "stage": view.run.spec.stage, "run": view.run.name,
                 "state": view.outcome.state if view.outcome else "Waiting"}
        if view.outcome and view.outcome.checkpoint:
            entry["checkpoint"] = view.outcome.checkpoint
        stages.append(entry)
        if view.index != state.current or phase is not None:
            continue
        outcome, run = view.outcome, view.run
        what = "evaluation Job" if isinstance(run, EvaluationJob) else "TrainingRun"
        why = outcome.message or f"{what} {run.name} is {outcome.state.lower()}"
        n = f"stage {view.index + 1}/{n_stages} ({view.name})"
        if outcome.state == "Failed":
            phase = Phase("Failed", "StageFailed", f"{n} failed: {what} {run.name}: {why}")
        elif pipeline.spec.suspend:
            phase = Phase("Suspended", "Suspended", f"{n} is suspended (spec.suspend: true); set it to false to resume")
        elif outcome.state == "Running":
            phase = Phase("Running", "StageRunning", f"{n} is running: {why}")
        else:
            phase = Phase("Pending", "StagePending", f"{n} is pending: {why}")

    if state.done:
        last_checkpoint = state.final_checkpoint
        phase = Phase("Succeeded", "AllStagesSucceeded",
                      f"all {len(stages)} stages succeeded" + (f"; final checkpoint {last_checkpoint}" if last_checkpoint else ""))
        current = pipeline.spec.stages[-1].name
    else:
        last_checkpoint = None
        current = state.current_stage.name if state.current_stage else None
    status = {**copy.deepcopy(old), "state": phase.state, "stage": current, "stages": stages, "children": backend.refs,
              "observedGeneration": body["metadata"].get("generation"),
              "conditions": conditions_for(phase, previous=old.get("conditions"))}
    if last_checkpoint:
        status["latestCheckpoint"] = last_checkpoint
    if state.model_uri:
        status["modelUri"] = state.model_uri  # where the final stage's trainer wrote the serving export
    if phase.state in TERMINAL:
        status.setdefault("completionTime", S.now_rfc3339())
    status.setdefault("startTime", S.now_rfc3339())
    write_status(kube, TRAININGPIPELINE, body, status)
    permanent = phase.message if phase.reason == "ChildRejected" else None
    return Outcome(status=status, retry_after=backend.retry_after, permanent=permanent, reason=phase.message)


class ClusterBackend:
    """flashops.api.pipeline's cluster backend: a stage is a TrainingRun object owned by the pipeline; start()
    creates it, outcome() reads its status (and keeps its suspend flag in step with the pipeline's)."""

    def __init__(self, kube: Kube, config: OperatorConfig, pipeline: S.TrainingPipeline, namespace: str):
        self.kube, self.config, self.pipeline, self.namespace = kube, config, pipeline, namespace
        self.refs: list[dict] = []
        self.phase: Phase | None = None  # why the current stage could not be created
        self.retry_after: float | None = None

    def _seen(self, obj: dict, run: S.TrainingRun) -> StageOutcome:
        self.refs.append(_ref(obj))
        st = obj.get("status") or {}
        state = st.get("state") or "Pending"
        want = self.pipeline.spec.suspend or run.spec.suspend
        if state not in TERMINAL and bool((obj.get("spec") or {}).get("suspend")) != want:
            self.kube.patch(*TRAININGRUN[:2], self.namespace, run.name, {"spec": {"suspend": want}})
        return StageOutcome(state, st.get("latestCheckpoint"), _active_message(st))

    def outcome(self, run: S.TrainingRun | EvaluationJob) -> StageOutcome | None:
        if isinstance(run, EvaluationJob):
            existing = self.kube.get(*C.JOB[:2], self.namespace, run.name)
            return None if existing is None else self._eval_seen(existing, run)
        existing = self.kube.get(*TRAININGRUN[:2], self.namespace, run.name)
        return None if existing is None else self._seen(existing, run)

    def _eval_seen(self, obj: dict, job: EvaluationJob) -> StageOutcome:
        """An eval stage's Job: Complete -> Succeeded (its pod recorded the evaluation in lineage), Failed ->
        Failed with the Job's reason; else Running while a pod is active, Pending before."""
        self.refs.append(_ref(obj))
        st = obj.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("status") != "True":
                continue
            if c.get("type") in ("Complete", "SuccessCriteriaMet"):
                return StageOutcome("Succeeded", job.model)
            if c.get("type") in ("Failed", "FailureTarget"):
                return StageOutcome("Failed", job.model, f"evaluation Job {job.name} failed: "
                                    f"{c.get('reason') or ''} {c.get('message') or ''}".strip())
        if st.get("active"):
            return StageOutcome("Running", job.model, f"evaluation Job {job.name} is evaluating {job.model}")
        return StageOutcome("Pending", job.model, f"evaluation Job {job.name} is waiting for its pod")

    def start(self, run: S.TrainingRun | EvaluationJob) -> StageOutcome:
        if isinstance(run, EvaluationJob):
            if self.pipeline.spec.suspend or run.spec.suspend:
                return StageOutcome("Pending", run.model, "suspended (spec.suspend): the evaluation waits")
            try:
                created = _create_child(self.kube, C.build_eval_job(replace(run, namespace=self.namespace),
                                                                   self.config, self.pipeline), C.JOB[1], self.config)
            except ChildError as e:
                self.phase, self.retry_after = e.phase, e.retry_after
                return StageOutcome("Pending", None, e.phase.message)
            return self._eval_seen(created, run)
        obj = run.to_dict()
        obj["metadata"]["namespace"] = self.namespace
        obj["metadata"]["ownerReferences"] = C.owner_references(self.pipeline)
        obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}),
                                     C.LABEL_MANAGED_BY: C.MANAGER, C.LABEL_OWNER_KIND: "TrainingPipeline",
                                     C.LABEL_OWNER: self.pipeline.name}
        obj["spec"]["suspend"] = self.pipeline.spec.suspend or obj["spec"].get("suspend", False)
        try:
            created = _create_child(self.kube, obj, TRAININGRUN[1], self.config)
        except ChildError as e:
            self.phase, self.retry_after = e.phase, e.retry_after
            return StageOutcome("Pending", None, e.phase.message)
        return self._seen(created, run)


def _active_message(status: dict) -> str:
    state = status.get("state")
    return next((c.get("message", "") for c in status.get("conditions") or []
                 if c.get("type") == state and c.get("status") == "True"), "")


def delete_training_pipeline(kube: Kube, body: dict) -> None:
    meta = body["metadata"]
    selector = f"{C.LABEL_OWNER_KIND}=TrainingPipeline,{C.LABEL_OWNER}={meta['name']}"
    for api, plural in (TRAININGRUN[:2], C.JOB[:2]):
        for run in kube.list(api, plural, meta.get("namespace"), selector):
            kube.delete(api, plural, meta.get("namespace"), run["metadata"]["name"])


# ----------------------------------------------------------------------------------------------- ModelDeployment


def resolve_model_source(kube: Kube, ext: Integrations, md: S.ModelDeployment) -> tuple[str | None, Phase | None]:
    """(model URI, None) or (None, a Phase saying what we wait for / what went wrong)."""
    src, ns = md.spec.source, md.metadata.namespace
    if is_uri(src):
        try:
            return resolve_reference(src, lineage=ext if ext.lineage_enabled else None).model_uri, None
        except LineageProblem:
            return resolve_reference(src).model_uri, None  # a URI needs no lineage: its shape says where
    if not src.startswith(S.LINEAGE_PREFIX):
        for api, plural, kind in (TRAININGPIPELINE, TRAININGRUN):
            obj = kube.get(api, plural, ns, src)
            if obj is None:
                continue
            st = obj.get("status") or {}
            state = st.get("state") or "Pending"
            if state == "Succeeded" and st.get("modelUri"):
                return st["modelUri"], None
            if state == "Succeeded" and st.get("latestCheckpoint"):
                labels = (obj.get("metadata") or {}).get("labels") or {}
                if kind == "TrainingRun" and LABEL_PIPELINE in labels and labels.get(LABEL_FINAL_STAGE) != "true":
                    return None, Phase("Failed", "SourceNotExported",
                                       f"source TrainingRun {src} is an intermediate stage of pipeline "
                                       f"{labels[LABEL_PIPELINE]}: only the final stage exports a model; use the "
                                       "pipeline (or its final stage) as spec.source")
                name = src if kind == "TrainingPipeline" else labels.get(LABEL_PIPELINE)
                return served_uri(st["latestCheckpoint"], name), None
            if state == "Failed":
                return None, Phase("Failed", "SourceFailed", f"source {kind} {src} failed: {_active_message(st)}")
            if state != "Succeeded":
                where = f" at stage {st['stage']}" if st.get("stage") and kind == "TrainingPipeline" else ""
                return None, Phase("Pending", "WaitingForModel", f"waiting for {kind} {src} to succeed (now {state}{where})")
            break  # succeeded without a known checkpoint: ask lineage below
    if not ext.lineage_enabled:
        return None, Phase("Pending", "SourceNotFound",
                           f"spec.source: {src!r} is not a finished TrainingRun or TrainingPipeline with a known checkpoint "
                           f"in namespace {ns}, and lineage is not configured (FLASHOPS_LINEAGE_URL) to resolve it")
    try:
        found = resolve_reference(src, lineage=ext)  # the one resolver (trainer and serving loader use it too)
    except LineageDown as e:
        return None, Phase("Pending", "LineageUnavailable", f"cannot resolve spec.source {src!r} yet: {e}")
    except UnresolvedReference as e:  # lineage answered: no such record (yet)
        return None, Phase("Pending", "SourceNotFound", f"lineage has no record of spec.source {src!r} yet ({e}); "
                           "waiting for it to be recorded")
    except LineageProblem as e:
        return None, Phase("Pending", "LineageRefused", f"lineage refused to resolve spec.source {src!r}: {e}; "
                           "fix the operator's lineage settings (FLASHOPS_LINEAGE_URL, its token) or spec.source")
    if not found.model_uri:
        return None, Phase("Pending", "SourceNotFound", f"lineage knows checkpoint {found.checkpoint_uri} for "
                           f"spec.source {src!r} but no serving export of it yet")
    return found.model_uri, None


def served_uri(uri: str, name: str | None = None) -> str:
    """The predictor loads model exports; a finished run's checkpoint is served through the export the
    trainer wrote next to it (export_location: <store>/models/<pipeline or run>/step-<n>)."""
    try:
        return export_location(uri, name)
    except ValueError:
        return uri  # neither a checkpoint nor a model URI of ours: serve it as given


def reconcile_model_deployment(kube: Kube, ext: Integrations, config: OperatorConfig, namespace: str, name: str) -> Outcome:
    body = kube.get(*MODELDEPLOYMENT[:2], namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome()
    try:
        md = _with_owner(_parse(body), body)
        if not isinstance(md, S.ModelDeployment):
            raise SpecError([f"expected a ModelDeployment, got {md.kind}"])
        if md.spec.source.startswith("s3://") and md.spec.runtime == "flashops":  # vllm: KServe's storage initializer
            C.resolve_s3(md.spec.storage, config, [md.spec.source])
    except (SpecError, C.InvalidObject) as e:
        return _invalid(kube, MODELDEPLOYMENT, body, str(e))

    old = body.get("status") or {}
    status: dict[str, Any] = copy.deepcopy(old)
    retry_after: float | None = None
    ready = False
    phase: Phase | None = None
    extra_conditions: list[dict] = []
    isvc: dict | None = None
    model_uri, waiting = resolve_model_source(kube, ext, md)
    if model_uri is None:
        phase = waiting or Phase("Pending", "WaitingForModel", "waiting for the model")
        retry_after = None if phase.state == "Failed" else config.retry_seconds
    else:
        api, plural, _ = INFERENCESERVICE
        try:
            isvc = kube.get(api, plural, namespace, isvc_name(md))
        except ApiError as e:
            isvc = None
            phase, retry_after = Phase("Pending", "ApiUnavailable", f"cannot read InferenceService {name}: {e}"), \
                config.retry_seconds
    if model_uri is not None and phase is None:
        # the promotion gate (flashops.api.promotion, shared with `flashops serve -f`) decides what is served
        served = ((isvc or {}).get("metadata", {}).get("annotations") or {}).get(MODEL_URI_ANNOTATION)
        plan = plan_rollout(ext, md, model_uri, served, old)
        if md.spec.promotion is not None:
            extra_conditions.append(promotion_condition(plan, old.get("conditions"), S.now_rfc3339()))
            if plan.decision is not None:
                status["promotion"] = plan.decision.to_status()
        if plan.blocked:
            retry_after = config.retry_seconds  # a new evaluation may be recorded: look again (backing off)
        status["mtpTokens"], status["mtpChoice"], status["canaryModel"] = \
            plan.mtp_tokens, plan.mtp_choice, plan.canary_model
        model_uri = plan.model
        if model_uri is None:
            phase = Phase("Pending", "PromotionBlocked", plan.decision.message if plan.decision else "nothing to serve")
    if model_uri is not None and phase is None:
        try:
            desired = build_inference_service(md, model_uri, config, plan.mtp_tokens)
        except C.InvalidObject as e:
            return _invalid(kube, MODELDEPLOYMENT, body, str(e))
        try:
            if isvc is None:
                isvc = _create_child(kube, desired, plural, config)
            elif isvc.get("spec") != desired["spec"] or \
                    (isvc["metadata"].get("annotations") or {}).get(MODEL_URI_ANNOTATION) != model_uri:
                # merge-patch replaces lists wholesale, so the predictor (its containers) is replaced as a whole;
                # an optional field the spec no longer sets is removed with null (canaryTrafficPercent dropped
                # to promote a canary fully, a CA bundle volume no longer used)
                predictor = dict(desired["spec"]["predictor"])
                for key in OPTIONAL_PREDICTOR_FIELDS:
                    if key in ((isvc.get("spec") or {}).get("predictor") or {}):
                        predictor.setdefault(key, None)
                isvc = kube.patch(api, plural, namespace, desired["metadata"]["name"], {
                    "metadata": {"annotations": desired["metadata"]["annotations"]},
                    "spec": {"predictor": predictor}}) or isvc
            phase, ready = inference_service_phase(isvc)
            notes = [canary_note(plan, md.spec.canary_traffic_percent)] + (
                [f"promotion of {plan.decision.candidate} blocked (condition PromotionBlocked has the numbers)"]
                if plan.blocked else [])
            if any(notes):
                phase = Phase(phase.state, phase.reason, "; ".join([phase.message] + [n for n in notes if n]))
            status["children"] = [_ref(isvc)]
            status["url"] = (isvc.get("status") or {}).get("url")
            status["latestCheckpoint"] = model_uri
            if ext.lineage_enabled and (not old.get("lineageId") or old.get("latestCheckpoint") != model_uri):
                try:
                    status["lineageId"] = ext.add_deployment(model_uri, md)
                except LineageDown as e:
                    phase = Phase(phase.state, phase.reason, f"{phase.message}; lineage not recorded yet (will retry): {e}")
                    retry_after = config.retry_seconds
                except LineageProblem as e:
                    phase = Phase(phase.state, phase.reason, f"{phase.message}; lineage did not record the deployment: {e}")
        except ChildError as e:
            phase, retry_after = e.phase, e.retry_after
    status.update(state=phase.state, observedGeneration=body["metadata"].get("generation"),
                  conditions=conditions_for(phase, previous=old.get("conditions"), ready=ready) + extra_conditions)
    status = {k: v for k, v in status.items() if v is not None}
    status.update({k: None for k in ROLLOUT_FIELDS if k in old and k not in status})  # null removes them (merge-patch)
    write_status(kube, MODELDEPLOYMENT, body, status)
    permanent = phase.message if phase.reason in ("ChildRejected", "SourceFailed") else None
    return Outcome(status=status, retry_after=retry_after, permanent=permanent, reason=phase.message)


def delete_model_deployment(kube: Kube, ext: Integrations, body: dict, give_up_on_lineage: bool) -> None:
    meta = body["metadata"]
    selector = f"{C.LABEL_OWNER_KIND}=ModelDeployment,{C.LABEL_OWNER}={meta['name']}"
    for isvc in kube.list(*INFERENCESERVICE[:2], meta.get("namespace"), selector):
        kube.delete(*INFERENCESERVICE[:2], meta.get("namespace"), isvc["metadata"]["name"])
    lineage_id = (body.get("status") or {}).get("lineageId")
    if lineage_id and ext.lineage_enabled:
        try:
            ext.close_deployment(lineage_id)
        except LineageDown:
            if not give_up_on_lineage:
                raise
            log.warning("ModelDeployment %s deleted without closing lineage deployment %s", meta["name"], lineage_id)
        except LineageProblem as e:
            log.info("ModelDeployment %s deleted; lineage deployment %s not closed: %s", meta["name"], lineage_id, e)
