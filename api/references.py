"""What a reference stands for, decided once: a checkpoint or model URI, a run, pipeline or deployment name, or
`lineage:<id>` -> `ResolvedArtifact(checkpoint_uri, model_uri)`: what to train from and what to serve. The
trainer (initFrom, dpo.reference), the serving loader (a deployment's source) and the operator call this.

    art = resolve_reference("quickstart", lineage=open_lineage())
    art.checkpoint_uri     # ".../runs/quickstart-rl/step-40"  (train from it)
    art.model_uri          # ".../models/quickstart/step-40"   (serve it; None when nothing was exported)

Lineage answers names and ids (`Lineage.resolve`: a pipeline's newest succeeded final checkpoint, its newest
export). Without lineage, or when lineage does not know a name, `latest_checkpoint(name)` (a store's newest
complete checkpoint of that run) is asked. A URI is looked up in lineage when there is one, else resolved by its
shape (a checkpoint's export is then assumed at export_location under its run's name). Torch-free; the lineage and the
store are passed in (api imports neither storage nor anything above it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from flashops.api.pipeline import export_location
from flashops.api.spec import LINEAGE_PREFIX

_CHECKPOINT_URI = re.compile(r"^.+?/runs/[^/]+/step-\d+/?$")
_MODEL_URI = re.compile(r"^.+?/models/[^/]+/[^/]+/?$")
URI_SCHEMES = ("s3://", "file://")


class Resolver(Protocol):
    def resolve(self, ref: str) -> dict: ...


class UnresolvedReference(LookupError):
    """Nothing is known under this reference (yet): the message says what was tried and what to do."""

    def __init__(self, ref: str, message: str):
        self.ref = ref
        super().__init__(message)


@dataclass(frozen=True)
class ResolvedArtifact:
    ref: str
    checkpoint_uri: str | None  # a complete checkpoint to train from (None: only an export is known)
    model_uri: str | None  # a serving export (None: not exported; a checkpoint URI's is its export_location)
    source: str = "uri"  # how it was found: "uri", "lineage" or "store"


def is_uri(ref: str) -> bool:
    return ref.startswith(URI_SCHEMES)


def from_lineage(ref: str, found: dict) -> ResolvedArtifact:
    """Lineage.resolve's answer -> the typed pair (the one reader of its keys)."""
    ckpt, model = found.get("checkpoint") or {}, found.get("model") or {}
    return ResolvedArtifact(ref, ckpt.get("uri"), model.get("uri"), "lineage")


def resolve_reference(ref: str, *, lineage: Resolver | None = None,
                      latest_checkpoint: Callable[[str], str | None] | None = None) -> ResolvedArtifact:
    """Resolve `ref`; raises UnresolvedReference when nothing is known. Errors of a lineage that cannot be
    reached propagate unchanged (the caller decides whether to retry)."""
    ref = str(ref).strip()
    if is_uri(ref):
        if lineage is not None:  # lineage knows whether (and where) a checkpoint was exported, e.g. under its pipeline
            try:
                found = from_lineage(ref, lineage.resolve(ref) or {})
                if found.checkpoint_uri or found.model_uri:
                    return found
            except LookupError:
                pass  # not recorded: its shape says what it is
        if _CHECKPOINT_URI.match(ref):
            return ResolvedArtifact(ref, ref, export_location(ref), "uri")
        if _MODEL_URI.match(ref):
            return ResolvedArtifact(ref, None, ref, "uri")
        return ResolvedArtifact(ref, None, ref, "uri")  # someone else's layout: serve it as given
    tried = []
    if lineage is not None:
        try:
            return from_lineage(ref, lineage.resolve(ref) or {})
        except LookupError as e:  # lineage's NotFound: fall back to the store for a run name
            tried.append(f"lineage: {e}")
    elif ref.startswith(LINEAGE_PREFIX):
        raise UnresolvedReference(ref, f"{ref!r} is a lineage id but no lineage is configured "
                                       "(FLASHOPS_LINEAGE_URL or --lineage): give a checkpoint or model URI")
    if latest_checkpoint is not None and not ref.startswith(LINEAGE_PREFIX):
        uri = latest_checkpoint(ref)
        if uri:
            return ResolvedArtifact(ref, uri, export_location(uri), "store")
        tried.append("the store has no complete checkpoint of a run by that name")
    raise UnresolvedReference(ref, f"nothing found for {ref!r} ({'; '.join(tried) or 'no lineage or store to ask'}); "
                                   "run that stage first, or give a checkpoint URI (flashops checkpoints list) or "
                                   "a model URI")


def describe(art: ResolvedArtifact) -> dict[str, Any]:
    return {"ref": art.ref, "checkpoint_uri": art.checkpoint_uri, "model_uri": art.model_uri, "source": art.source}
