"""The operator's two outside services, both optional: lineage (flashops.api.lineage) and the checkpoint
store (flashops.storage, its torch-free core). Neither may ever crash-loop the operator.

    ext = Integrations(config)
    ext.latest_checkpoint("s3://flashops/checkpoints/default", "pretrain-a")   # "s3://.../step-100" | None
    ext.start_run(run, k8s_ref)                                                # lineage id; raises LineageDown

Lineage failures are told apart (issue 17 item 6), each a LineageProblem:
- LineageDown: lineage cannot be reached or says "try later" (503, network, database busy): retry with backoff;
- LineageNotFound: lineage answered that the record does not exist (404): a source to wait for, not an outage;
- LineageRefused: lineage answered with a permanent error (bad input, bad token, conflict): a retry as is cannot
  help, the status says what to fix.
The reconciler records the reason in the status and leaves the child running. Store failures return None plus
a note: a retry without a known checkpoint still resumes, because the trainer looks for the newest one itself.
"""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

from flashops.api import spec as S
from flashops.operator.config import OperatorConfig

log = logging.getLogger("flashops.operator")


class LineageProblem(RuntimeError):
    """A lineage call did not do its job; the subclass says whether waiting can help."""


class LineageDown(LineageProblem):
    """Lineage is configured but cannot be reached (or its client is not installed); retry later."""


class LineageNotFound(LineageProblem, LookupError):
    """Lineage answered: no such record (yet)."""


class LineageRefused(LineageProblem):
    """Lineage answered with a permanent error: the request or the operator's settings must change."""


class Integrations:
    def __init__(self, config: OperatorConfig):
        self.config = config
        self._lineage: Any = None
        self._lock = threading.Lock()
        self.last_store_error: str | None = None

    # ------------------------------------------------------------------------------ lineage

    @property
    def lineage_enabled(self) -> bool:
        return bool(self.config.lineage_url)

    def lineage(self) -> Any:
        with self._lock:
            if self._lineage is None:
                try:
                    module = importlib.import_module("flashops.api.lineage")
                    self._lineage = module.open_lineage(self.config.lineage_url)
                except ImportError as e:
                    raise LineageDown(f"the lineage client (flashops.api.lineage) cannot be imported: {e}") from e
                except Exception as e:  # noqa: BLE001 - sorted: a bad URL or token is not an outage
                    if getattr(e, "temporary", None) is False or isinstance(e, ValueError):
                        raise LineageRefused(f"cannot open lineage at {self.config.lineage_url}: {e}: "
                                             "fix FLASHOPS_LINEAGE_URL") from e
                    raise LineageDown(f"cannot open lineage at {self.config.lineage_url}: {e}") from e
            return self._lineage

    def _call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.lineage(), fn)(*args, **kwargs)
        except LineageProblem:
            raise
        except Exception as e:  # noqa: BLE001 - sorted below by what the lineage client says it is
            where = f"lineage {what} at {self.config.lineage_url}"
            if getattr(e, "temporary", None) is False:  # flashops.api.lineage.errors: a permanent answer
                if isinstance(e, LookupError):
                    raise LineageNotFound(f"{where}: {e}") from e
                raise LineageRefused(f"{where} was refused: {type(e).__name__}: {e}") from e
            raise LineageDown(f"{where} failed: {type(e).__name__}: {e}") from e

    def start_run(self, run: S.TrainingRun, kind: str = "TrainingRun") -> str:
        pipeline = run.metadata.labels.get("flashops.dev/pipeline")
        extra = {"pipeline": pipeline} if pipeline else {}
        lineage_id = self._call(
            "start_run", "start_run", name=run.name, kind=kind, stage=run.spec.stage, spec=run.spec.to_dict(),
            spec_hash=run.spec_hash(), k8s_ref=k8s_ref(run),
            consumed=(run.spec.data_uri,),  # the same dataset the trainer reads (and flashops run records)
            initialized_from=run.spec.init_from, **extra,
        )
        return str(lineage_id)

    def finish_run(self, lineage_id: str, status: str, metrics: dict | None = None) -> None:
        self._call("finish_run", "finish_run", _as_id(lineage_id), status, metrics or {})

    def resolve(self, ref: str) -> dict:
        return self._call("resolve", "resolve", ref) or {}

    def add_deployment(self, model: Any, deployment: S.ModelDeployment) -> str:
        """`model`: a lineage id or the model/checkpoint URI being served."""
        return str(self._call("add_deployment", "add_deployment", model, deployment.name,
                              deployment.metadata.namespace, k8s_ref(deployment),
                              deployment.spec.canary_traffic_percent if deployment.spec.canary_traffic_percent is not None else 100))

    def evaluations(self, ref: Any) -> list[dict]:
        """The evaluations recorded for a checkpoint or model (newest first); LineageNotFound if lineage has no such
        artifact (flashops.api.promotion.recorded_evaluations reads that as "none")."""
        return self._call("evaluations", "evaluations", ref) or []

    def close_deployment(self, lineage_id: str) -> None:
        self._call("close_deployment", "close_deployment", _as_id(lineage_id))

    # ------------------------------------------------------------------------------ checkpoints

    def latest_checkpoint(self, store_uri: str, run_name: str) -> str | None:
        """URI of the newest verified checkpoint of `run_name` under `store_uri`, None if none or unknown."""
        self.last_store_error = None
        try:
            storage = importlib.import_module("flashops.storage")
            ref = storage.open_store(store_uri).latest(run_name)
        except (ImportError, AttributeError) as e:
            self.last_store_error = f"the checkpoint store API (flashops.storage.open_store) is not available: {e}"
            return None
        except Exception as e:  # noqa: BLE001 - store down or misconfigured: resume still works in the trainer
            self.last_store_error = f"cannot list checkpoints in {store_uri}: {type(e).__name__}: {e}"
            log.warning(self.last_store_error)
            return None
        if ref is None:
            return None
        return str(getattr(ref, "uri", ref))


def k8s_ref(obj: S.SpecObject) -> dict:
    """How lineage points back at the Kubernetes object (uid survives renames; labels carry the pipeline)."""
    return {"apiVersion": S.API_GROUP_VERSION, "kind": obj.kind, "namespace": obj.metadata.namespace,
            "name": obj.name, "uid": obj.metadata.uid, "labels": dict(obj.metadata.labels)}


def _as_id(value: str) -> Any:
    return int(value) if isinstance(value, str) and value.isdigit() else value
