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
from dataclasses import dataclass
from typing import Any

from flashops.api import spec as S
from flashops.api.loader import SpecError, parse_object
from flashops.operator import children as C
from flashops.operator.config import OperatorConfig
from flashops.operator.inference import INFERENCESERVICE, build_inference_service
from flashops.operator.integrations import Integrations, LineageDown
from flashops.operator.kube import ApiError, Kube
from flashops.operator.status import TERMINAL, Phase, conditions_for, inference_service_phase, job_phase, same_status

log = logging.getLogger("flashops.operator")

TRAININGRUN = (S.API_GROUP_VERSION, "trainingruns", "TrainingRun")
TRAININGPIPELINE = (S.API_GROUP_VERSION, "trainingpipelines", "TrainingPipeline")
MODELDEPLOYMENT = (S.API_GROUP_VERSION, "modeldeployments", "ModelDeployment")
RESOURCES = {"TrainingRun": TRAININGRUN, "TrainingPipeline": TRAININGPIPELINE, "ModelDeployment": MODELDEPLOYMENT}
CRD_MISSING_RETRY = 30.0


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


def _parse(body: dict) -> S._Object:
    clean = {k: v for k, v in body.items() if k != "status"}
    return parse_object(clean, source=f"{body.get('kind', '?')}/{body.get('metadata', {}).get('name', '?')}")


def write_status(kube: Kube, res: tuple, body: dict, status: dict) -> dict:
    """Merge-patch the status subresource, skipping writes that would change nothing (no event storms)."""
    if same_status(body.get("status"), status):
        return status
    meta = body["metadata"]
    kube.patch(res[0], res[1], meta.get("namespace"), meta["name"], {"status": status}, subresource="status")
    return status


def _invalid(kube: Kube, res: tuple, body: dict, message: str) -> Outcome:
    """A spec that cannot run: Accepted=False and, unless a child already runs, Failed, with the reason."""
    old = body.get("status") or {}
    phase = Phase("Failed", "InvalidSpec", message)
    status = {**old, "observedGeneration": body["metadata"].get("generation")}
    if old.get("children") and old.get("state") not in (None, "Failed"):
        # An invalid update to a running object: the child keeps running; only Accepted flips.
        conds = [dict(c) for c in old.get("conditions") or []]
        for c in conds:
            if c.get("type") == "Accepted":
                c.update(status="False", reason="InvalidSpec", message=message, lastTransitionTime=S.now_rfc3339())
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


def _with_owner(obj: S._Object, body: dict) -> S._Object:
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
    except (SpecError, C.InvalidObject) as e:
        return _invalid(kube, TRAININGRUN, body, str(e))

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

    def create_attempt(attempt: int) -> dict:
        cm = C.spec_configmap(run, config)
        existing_cm = kube.get("v1", "configmaps", namespace, cm["metadata"]["name"])
        if existing_cm is None:
            _create_child(kube, cm, "configmaps", config)
        elif existing_cm.get("data") != cm["data"]:
            kube.patch("v1", "configmaps", namespace, cm["metadata"]["name"], {"data": cm["data"]})
        status.setdefault("startTime", S.now_rfc3339())
        return _create_child(kube, C.build_job(run, attempt, config, lineage_id), job_plural, config)

    child_name = C.child_name(name, retries)
    try:
        child = kube.get(job_api, job_plural, namespace, child_name)
        final = old.get("state") == "Succeeded" or (old.get("state") == "Failed" and retries >= limit)
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
            if phase.state == "Failed" and retries < limit:
                failed = phase
                retries += 1
                latest = ext.latest_checkpoint(store_uri, name)
                resume = latest or f"the latest complete checkpoint under {store_uri} (none known yet)"
                phase = Phase("Pending", "Retrying", f"{job_kind} {child_name} failed ({failed.reason}: {failed.message}); "
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
            ext.finish_run(lineage_id, phase.state.lower(), {"retries": retries})
            status["lineageClosed"] = True
        except LineageDown as e:
            notes.append(f"lineage not closed yet (will retry): {e}")
            retry_after = retry_after or config.retry_seconds

    if notes:
        phase = Phase(phase.state, phase.reason, "; ".join([phase.message, *notes]))
    status.update(state=phase.state, stage=run.spec.stage, retries=retries,
                  observedGeneration=body["metadata"].get("generation"),
                  conditions=conditions_for(phase, previous=(body.get("status") or {}).get("conditions")))
    write_status(kube, TRAININGRUN, body, status)
    permanent = phase.message if phase.reason == "ChildRejected" else None
    return Outcome(status=status, retry_after=retry_after, permanent=permanent, reason=phase.message)


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


# ----------------------------------------------------------------------------------------------- TrainingPipeline


def reconcile_training_pipeline(kube: Kube, ext: Integrations, config: OperatorConfig, namespace: str, name: str) -> Outcome:
    body = kube.get(*TRAININGPIPELINE[:2], namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome()
    try:
        pipeline = _with_owner(_parse(body), body)
        if not isinstance(pipeline, S.TrainingPipeline):
            raise SpecError([f"expected a TrainingPipeline, got {pipeline.kind}"])
        for i in range(len(pipeline.spec.stages)):  # every stage must be runnable before the first starts
            C.build_job(_with_owner(S.pipeline_stage_run(pipeline, i, None), body), 0, config)
    except (SpecError, C.InvalidObject) as e:
        return _invalid(kube, TRAININGPIPELINE, body, str(e))

    old = body.get("status") or {}
    stages: list[dict] = []
    refs: list[dict] = []
    phase: Phase | None = None
    current: str | None = None
    previous: str | None = None  # the previous stage's final checkpoint, else its run name (resolved via lineage)
    last_checkpoint: str | None = None
    retry_after: float | None = None
    for i, stage in enumerate(pipeline.spec.stages):
        run = S.pipeline_stage_run(pipeline, i, previous)
        entry = {"name": stage.name, "stage": stage.spec.stage, "run": run.name, "state": "Waiting"}
        stages.append(entry)
        if phase is not None:
            continue  # a later stage: waits for the current one
        existing = kube.get(*TRAININGRUN[:2], namespace, run.name)
        if existing is None:
            obj = run.to_dict()
            obj["metadata"]["namespace"] = namespace
            obj["metadata"]["ownerReferences"] = C.owner_references(pipeline)
            obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}),
                                         C.LABEL_MANAGED_BY: C.MANAGER, C.LABEL_OWNER_KIND: "TrainingPipeline",
                                         C.LABEL_OWNER: pipeline.name}
            obj["spec"]["suspend"] = pipeline.spec.suspend or obj["spec"].get("suspend", False)
            try:
                existing = _create_child(kube, obj, "trainingruns", config)
            except ChildError as e:
                phase, retry_after = e.phase, e.retry_after
                current = stage.name
                entry["state"] = "Pending"
                continue
        refs.append(_ref(existing))
        st = existing.get("status") or {}
        state = st.get("state") or "Pending"
        entry["state"] = state
        if st.get("latestCheckpoint"):
            entry["checkpoint"] = st["latestCheckpoint"]
        if state == "Succeeded":
            previous = st.get("latestCheckpoint") or run.name
            last_checkpoint = st.get("latestCheckpoint")
            continue
        current = stage.name
        want = pipeline.spec.suspend or run.spec.suspend
        if bool((existing.get("spec") or {}).get("suspend")) != want and state not in TERMINAL:
            kube.patch(*TRAININGRUN[:2], namespace, run.name, {"spec": {"suspend": want}})
        why = _active_message(st) or f"TrainingRun {run.name} is {state.lower()}"
        n = f"stage {i + 1}/{len(pipeline.spec.stages)} ({stage.name})"
        if state == "Failed":
            phase = Phase("Failed", "StageFailed", f"{n} failed: TrainingRun {run.name}: {why}")
        elif pipeline.spec.suspend:
            phase = Phase("Suspended", "Suspended", f"{n} is suspended (spec.suspend: true); set it to false to resume")
        elif state == "Running":
            phase = Phase("Running", "StageRunning", f"{n} is running: {why}")
        else:
            phase = Phase("Pending", "StagePending", f"{n} is pending: {why}")

    if phase is None:
        phase = Phase("Succeeded", "AllStagesSucceeded",
                      f"all {len(stages)} stages succeeded" + (f"; final checkpoint {last_checkpoint}" if last_checkpoint else ""))
        current = pipeline.spec.stages[-1].name
    status = {**copy.deepcopy(old), "state": phase.state, "stage": current, "stages": stages, "children": refs,
              "observedGeneration": body["metadata"].get("generation"),
              "conditions": conditions_for(phase, previous=old.get("conditions"))}
    if last_checkpoint:
        status["latestCheckpoint"] = last_checkpoint
    if phase.state in TERMINAL:
        status.setdefault("completionTime", S.now_rfc3339())
    status.setdefault("startTime", S.now_rfc3339())
    write_status(kube, TRAININGPIPELINE, body, status)
    permanent = phase.message if phase.reason == "ChildRejected" else None
    return Outcome(status=status, retry_after=retry_after, permanent=permanent, reason=phase.message)


def _active_message(status: dict) -> str:
    state = status.get("state")
    return next((c.get("message", "") for c in status.get("conditions") or []
                 if c.get("type") == state and c.get("status") == "True"), "")


def delete_training_pipeline(kube: Kube, body: dict) -> None:
    meta = body["metadata"]
    selector = f"{C.LABEL_OWNER_KIND}=TrainingPipeline,{C.LABEL_OWNER}={meta['name']}"
    for run in kube.list(*TRAININGRUN[:2], meta.get("namespace"), selector):
        kube.delete(*TRAININGRUN[:2], meta.get("namespace"), run["metadata"]["name"])


# ----------------------------------------------------------------------------------------------- ModelDeployment


def resolve_model_source(kube: Kube, ext: Integrations, md: S.ModelDeployment) -> tuple[str | None, Phase | None]:
    """(model URI, None) or (None, a Phase saying what we wait for / what went wrong)."""
    src, ns = md.spec.source, md.metadata.namespace
    if src.startswith(("s3://", "file://")):
        return src, None
    if not src.startswith(S.LINEAGE_PREFIX):
        for api, plural, kind in (TRAININGPIPELINE, TRAININGRUN):
            obj = kube.get(api, plural, ns, src)
            if obj is None:
                continue
            st = obj.get("status") or {}
            state = st.get("state") or "Pending"
            if state == "Succeeded" and st.get("latestCheckpoint"):
                return served_uri(st["latestCheckpoint"]), None
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
        info = ext.resolve(src)
    except LineageDown as e:
        return None, Phase("Pending", "LineageUnavailable", f"cannot resolve spec.source {src!r} yet: {e}")
    uri = info.get("uri") or info.get("checkpoint_uri") or info.get("model_uri")
    if not uri:
        return None, Phase("Pending", "SourceNotFound", f"lineage has no checkpoint or model for spec.source {src!r} yet")
    return served_uri(uri), None


def served_uri(uri: str) -> str:
    """The predictor loads model exports; a finished run's checkpoint is served through the export the
    trainer wrote next to it (<store>/models/<run>/step-<n>)."""
    from flashops.storage import StoreConfigError, exported_model_uri

    try:
        return exported_model_uri(uri)
    except StoreConfigError:
        return uri  # neither a checkpoint nor a model URI of ours: serve it as given


def reconcile_model_deployment(kube: Kube, ext: Integrations, config: OperatorConfig, namespace: str, name: str) -> Outcome:
    body = kube.get(*MODELDEPLOYMENT[:2], namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome()
    try:
        md = _with_owner(_parse(body), body)
        if not isinstance(md, S.ModelDeployment):
            raise SpecError([f"expected a ModelDeployment, got {md.kind}"])
        if md.spec.source.startswith("s3://"):
            C.resolve_s3(md.spec.storage, config, [md.spec.source])
    except (SpecError, C.InvalidObject) as e:
        return _invalid(kube, MODELDEPLOYMENT, body, str(e))

    old = body.get("status") or {}
    status: dict[str, Any] = copy.deepcopy(old)
    retry_after: float | None = None
    ready = False
    model_uri, waiting = resolve_model_source(kube, ext, md)
    if model_uri is None:
        phase = waiting or Phase("Pending", "WaitingForModel", "waiting for the model")
        retry_after = None if phase.state == "Failed" else config.retry_seconds
    else:
        try:
            desired = build_inference_service(md, model_uri, config)
        except C.InvalidObject as e:
            return _invalid(kube, MODELDEPLOYMENT, body, str(e))
        api, plural, _ = INFERENCESERVICE
        try:
            isvc = kube.get(api, plural, namespace, desired["metadata"]["name"])
            if isvc is None:
                isvc = _create_child(kube, desired, plural, config)
            elif isvc.get("spec") != desired["spec"] or \
                    (isvc["metadata"].get("annotations") or {}).get("flashops.dev/model-uri") != model_uri:
                # merge-patch replaces lists wholesale, so the predictor (its containers) is replaced as a whole
                isvc = kube.patch(api, plural, namespace, desired["metadata"]["name"], {
                    "metadata": {"annotations": desired["metadata"]["annotations"]},
                    "spec": {"predictor": desired["spec"]["predictor"]}}) or isvc
            phase, ready = inference_service_phase(isvc)
            status["children"] = [_ref(isvc)]
            status["url"] = (isvc.get("status") or {}).get("url")
            status["latestCheckpoint"] = model_uri
            if ext.lineage_enabled and (not old.get("lineageId") or old.get("latestCheckpoint") != model_uri):
                try:
                    status["lineageId"] = ext.add_deployment(model_uri, md)
                except LineageDown as e:
                    phase = Phase(phase.state, phase.reason, f"{phase.message}; lineage not recorded yet (will retry): {e}")
                    retry_after = config.retry_seconds
        except ChildError as e:
            phase, retry_after = e.phase, e.retry_after
    status.update(state=phase.state, observedGeneration=body["metadata"].get("generation"),
                  conditions=conditions_for(phase, previous=old.get("conditions"), ready=ready))
    status = {k: v for k, v in status.items() if v is not None}
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
