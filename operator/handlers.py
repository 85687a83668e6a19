"""The kopf handlers: thin. Each one names a trigger and calls a reconciler from flashops.operator.reconcile.

Triggers per kind: create/update/resume of the object, events of its children (PyTorchJob, TrainJob,
InferenceService, a pipeline's TrainingRuns), a resync timer, and a finalizer on delete. Whatever fired,
the same level-triggered reconciler runs, serialized per object by a lock.

Waiting (issue 17 item 6) writes nothing: an object that waits (for its source, for lineage, for a CRD) is
woken in memory after retrySeconds, doubling each time up to the resync interval (where the resync timer takes
over), and at once when the awaited object changes (the child/source watches). A kopf TemporaryError would
instead write two progress annotations to the object per retry, forever.

    registry = kopf.OperatorRegistry()
    FlashopsOperator(OperatorConfig.from_env()).register(registry)
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any, Callable

import kopf

from flashops.api import spec as S
from flashops.operator import children as C
from flashops.operator import reconcile as R
from flashops.operator.config import OperatorConfig
from flashops.operator.integrations import Integrations, LineageDown
from flashops.operator.kube import USER_AGENT, ApiError, Kube, load_configuration

log = logging.getLogger("flashops.operator")
G, V = S.API_GROUP, S.API_VERSION
LINEAGE_DELETE_ATTEMPTS = 3  # a dead lineage service may delay deletion a little, never block it

RECONCILERS: dict[str, Callable[..., R.Outcome]] = {
    "TrainingRun": R.reconcile_training_run,
    "TrainingPipeline": R.reconcile_training_pipeline,
    "ModelDeployment": R.reconcile_model_deployment,
}


class FlashopsOperator:
    def __init__(self, config: OperatorConfig, kube: Kube | None = None, ext: Integrations | None = None):
        self.config = config
        self._kube = kube
        self.ext = ext or Integrations(config)
        self._locks: dict[tuple, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._waits: dict[tuple, int] = {}  # consecutive waits per object: the backoff exponent
        self._timers: dict[tuple, threading.Timer] = {}
        self._closed = False
        self.reconciles = 0  # how many reconciles ran (benchmarks report it)

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube.from_environment(self.config.workers)
        return self._kube

    def lock(self, kind: str, namespace: str | None, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(kind, namespace, name)]

    def reconcile(self, kind: str, namespace: str | None, name: str, quiet: bool = False) -> R.Outcome | None:
        """Run the reconciler; a wait is scheduled in memory (wait_later), a permanent problem becomes kopf's
        PermanentError (quiet: logged instead)."""
        if not name:
            return None
        try:
            with self.lock(kind, namespace, name):
                self.reconciles += 1
                outcome = RECONCILERS[kind](self.kube, self.ext, self.config, namespace, name)
        except ApiError as e:
            if quiet:
                log.info("%s %s/%s: will retry: %s", kind, namespace, name, e)
                self.wait_later(kind, namespace, name, self.config.retry_seconds)
                return None
            if e.temporary or e.status in (401, 403, 404):
                raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=self.config.retry_seconds) from None
            raise kopf.PermanentError(f"Kubernetes API rejected a request: {e}") from None
        if outcome.retry_after and not outcome.permanent:
            self.wait_later(kind, namespace, name, outcome.retry_after)
        else:
            self.stop_waiting(kind, namespace, name)
        if not quiet and outcome.permanent:
            raise kopf.PermanentError(outcome.permanent)
        return outcome

    def wait_delay(self, key: tuple, first: float) -> float | None:
        """The next wait of an object: first, 2x, 4x... capped by the resync interval (None: leave it to resync)."""
        with self._locks_guard:
            n = self._waits.get(key, 0)
            self._waits[key] = n + 1
        delay = first * 2 ** n
        return delay if delay < self.config.resync_seconds else None

    def wait_later(self, kind: str, namespace: str | None, name: str, first: float) -> None:
        """Reconcile again after a growing delay, in memory: no write to the object while it waits."""
        key = (kind, namespace, name)
        delay = self.wait_delay(key, first)
        timer = threading.Timer(delay, self.reconcile, (kind, namespace, name), {"quiet": True}) if delay else None
        with self._locks_guard:
            old = self._timers.pop(key, None)
            if timer is not None and not self._closed:
                timer.daemon = True
                self._timers[key] = timer
        if old is not None:
            old.cancel()
        if timer is not None and self._timers.get(key) is timer:
            timer.start()

    def stop_waiting(self, kind: str, namespace: str | None, name: str) -> None:
        key = (kind, namespace, name)
        with self._locks_guard:
            self._waits.pop(key, None)
            timer = self._timers.pop(key, None)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    def close(self) -> None:
        """Cancel every pending wake-up (the operator stops; a restart resumes every object anyway)."""
        with self._locks_guard:
            self._closed = True
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()

    def finalize(self, kind: str, body: Any, retry: int) -> None:
        raw = {k: body[k] for k in body}
        meta = raw["metadata"]
        try:
            with self.lock(kind, meta.get("namespace"), meta["name"]):
                give_up = retry >= LINEAGE_DELETE_ATTEMPTS
                if kind == "TrainingRun":
                    R.delete_training_run(self.kube, self.ext, self.config, raw, give_up)
                elif kind == "TrainingPipeline":
                    R.delete_training_pipeline(self.kube, raw)
                else:
                    R.delete_model_deployment(self.kube, self.ext, raw, give_up)
        except LineageDown as e:
            raise kopf.TemporaryError(f"closing the lineage record: {e}", delay=self.config.retry_seconds) from None
        except ApiError as e:
            raise kopf.TemporaryError(f"deleting children: {e}", delay=self.config.retry_seconds) from None

    # ------------------------------------------------------------------------------------------ registration

    def register(self, registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
        config = self.config

        @kopf.on.startup(registry=registry)
        def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.persistence.finalizer = f"{G}/finalizer"
            settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=G)
            settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=G, key="last-handled-configuration")
            settings.execution.max_workers = config.workers
            settings.posting.level = logging.WARNING  # Kubernetes Events only for problems
            settings.peering.standalone = True
            settings.watching.server_timeout = 300
            settings.watching.client_timeout = 330
            settings.networking.request_timeout = 60

        @kopf.on.login(registry=registry)
        async def login(**_: Any) -> kopf.AiohttpSession:
            """kopf's own connection, with the operator's User-Agent: the API server then records kopf's writes
            (finalizers, progress annotations) under the field manager `flashops` too."""
            import aiohttp

            cfg = load_configuration(config.workers)
            auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken") or ""
            scheme, _, token = auth.partition(" ")
            info = kopf.ConnectionInfo(
                server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
                scheme=scheme or None, token=token or None,
                username=cfg.username or None, password=cfg.password or None,
                certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
            )
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "User-Agent": USER_AGENT})
            return kopf.AiohttpSession(server=info.server, aiohttp_session=session)

        for kind, plural in S.PLURALS.items():
            self._register_kind(registry, kind, plural)

        def owner_of(kind: str) -> Callable[..., None]:
            def on_child_event(labels: Any, namespace: str, **_: Any) -> None:
                self.reconcile(kind, namespace, labels.get(C.LABEL_OWNER, ""), quiet=True)
            return on_child_event

        run_children = {C.LABEL_OWNER_KIND: "TrainingRun"}
        kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=run_children, registry=registry,
                      id="pytorchjob-event")(owner_of("TrainingRun"))
        kopf.on.event("trainer.kubeflow.org", "v1alpha1", "trainjobs", labels=run_children, registry=registry,
                      id="trainjob-event")(owner_of("TrainingRun"))
        kopf.on.event(G, V, S.PLURALS["TrainingRun"], labels={C.LABEL_OWNER_KIND: "TrainingPipeline"}, registry=registry,
                      id="stage-run-event")(owner_of("TrainingPipeline"))
        kopf.on.event("batch", "v1", "jobs", labels={C.LABEL_OWNER_KIND: "TrainingPipeline"}, registry=registry,
                      id="eval-job-event")(owner_of("TrainingPipeline"))
        kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels={C.LABEL_OWNER_KIND: "ModelDeployment"},
                      registry=registry, id="inferenceservice-event")(owner_of("ModelDeployment"))

        @kopf.index(G, V, S.PLURALS["ModelDeployment"], registry=registry, id="deployments_by_source")
        def deployments_by_source(namespace: str, name: str, spec: Any, **_: Any) -> dict:
            return {(namespace, spec.get("source")): name}

        def source_finished(namespace: str, name: str, status: Any, deployments_by_source: kopf.Index, **_: Any) -> None:
            """A run or pipeline finished: deployments waiting for it as their source go ahead now."""
            if (status or {}).get("state") != "Succeeded":
                return
            for deployment in deployments_by_source.get((namespace, name), []):
                self.reconcile("ModelDeployment", namespace, deployment, quiet=True)

        kopf.on.event(G, V, S.PLURALS["TrainingRun"], registry=registry, id="run-source-event")(source_finished)
        kopf.on.event(G, V, S.PLURALS["TrainingPipeline"], registry=registry, id="pipeline-source-event")(source_finished)
        return registry

    def _register_kind(self, registry: kopf.OperatorRegistry, kind: str, plural: str) -> None:
        def changed(namespace: str, name: str, **_: Any) -> None:
            self.reconcile(kind, namespace, name)

        def resync(namespace: str, name: str, **_: Any) -> None:
            self.reconcile(kind, namespace, name, quiet=True)

        def deleted(body: Any, retry: int, **_: Any) -> None:
            self.finalize(kind, body, retry)

        key = kind.lower()
        kopf.on.resume(G, V, plural, registry=registry, id=f"{key}-resume")(changed)
        kopf.on.create(G, V, plural, registry=registry, id=f"{key}-create")(changed)
        kopf.on.update(G, V, plural, registry=registry, id=f"{key}-update")(changed)
        kopf.on.delete(G, V, plural, registry=registry, id=f"{key}-delete")(deleted)
        kopf.timer(G, V, plural, registry=registry, id=f"{key}-resync", interval=self.config.resync_seconds,
                   initial_delay=self.config.resync_seconds, idle=None)(resync)
