"""Lineage: which data, spec and parent checkpoint produced every checkpoint, model and deployment.

    from flashops.api.lineage import open_lineage
    lin = open_lineage()                                   # $FLASHOPS_LINEAGE_URL, else SQLite in $FLASHOPS_HOME
    lin = open_lineage("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    lin = open_lineage("http://lineage:8080")              # token from $FLASHOPS_LINEAGE_TOKEN
    lin.resolve("quickstart")["uri"]

Direct SQL (store.SqlLineage) and the HTTP client (client.HttpLineage) have the same methods; the
HTTP API (app.py, `flashops lineage serve`) is the direct-SQL store behind FastAPI.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Protocol

from flashops.api.lineage.errors import (Conflict, Forbidden, InvalidInput, LineageError, NotFound, Unauthorized,
                                         Unavailable)

__all__ = ["open_lineage", "Lineage", "NullLineage", "as_lineage", "LineageError", "InvalidInput", "NotFound", "Conflict", "Unauthorized",
           "Forbidden", "Unavailable"]


class Lineage(Protocol):
    """The contract (docs/architecture.md). Every write is idempotent and one transaction."""

    def upsert_dataset(self, uri: str, content_hash: str | None = None, version: str | None = None,
                       derived_from: Any = None) -> int: ...
    def start_run(self, name: str, kind: str, stage: str, spec: dict, spec_hash: str, k8s_ref: Any = None,
                  consumed: Iterable[Any] = (), initialized_from: Any = None, pipeline: str | None = None) -> int: ...
    def finish_run(self, run_id: Any, status: str, metrics: dict | None = None) -> None: ...
    def add_checkpoint(self, run_id: Any, uri: str, step: int | None, manifest_hash: str | None = None,
                       metrics: dict | None = None) -> int: ...
    def add_model(self, checkpoint_id: Any, uri: str, name: str, version: str, quantization: str = "none",
                  manifest_hash: str | None = None) -> int: ...
    def add_deployment(self, model_id: Any, name: str, namespace: str | None = None, k8s_ref: Any = None,
                       traffic_percent: int | None = 100) -> int: ...
    def close_deployment(self, deployment_id: Any) -> None: ...
    def record_metrics(self, run_id: Any, rows: list[dict]) -> int: ...
    def add_evaluation(self, target_id: Any, result: dict, name: str | None = None) -> int: ...
    def resolve(self, ref: Any) -> dict: ...
    # queries
    def find(self, ref: Any) -> int: ...
    def node(self, ref: Any, limit: int = 100) -> dict: ...
    def list_nodes(self, **filters: Any) -> dict: ...
    def ancestors(self, ref: Any, depth: int = 10, limit: int = 1000) -> dict: ...
    def descendants(self, ref: Any, depth: int = 10, limit: int = 1000) -> dict: ...
    def provenance(self, ref: Any) -> dict: ...
    def derived(self, ref: Any) -> dict: ...
    def diff_runs(self, a: Any, b: Any) -> dict: ...
    def run_metrics(self, ref: Any, max_points: int = 2000) -> dict: ...
    def evaluations(self, target_id: Any) -> list[dict]: ...
    def close(self) -> None: ...


class NullLineage:
    """Lineage switched off (`flashops run` without it, ranks other than 0): every write records nothing and
    returns None, every lookup answers NotFound. The trainer always holds a Lineage; this is the off one."""

    def __bool__(self) -> bool:
        return False  # `if lineage:` reads as "is lineage on"

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    upsert_dataset = start_run = finish_run = add_checkpoint = add_model = add_deployment = _nothing
    close_deployment = add_evaluation = close = _nothing

    def record_metrics(self, run_id: Any, rows: list[dict]) -> int:
        return 0

    def _unknown(self, ref: Any = None, *args: Any, **kwargs: Any) -> Any:
        raise NotFound(f"{ref!r}: lineage is off here (set FLASHOPS_LINEAGE_URL or --lineage to record and look up)")

    resolve = find = node = ancestors = descendants = provenance = derived = run_metrics = _unknown

    def list_nodes(self, **filters: Any) -> dict:
        return {"items": [], "next": None}

    def evaluations(self, target_id: Any) -> list[dict]:
        return []  # nothing is recorded, so nothing was evaluated before

    def diff_runs(self, a: Any, b: Any) -> dict:
        return self._unknown(a)


def as_lineage(lineage: Any) -> Lineage:
    """None or False (the old spellings of "off") -> NullLineage(); a Lineage as is."""
    return NullLineage() if lineage is None or lineage is False else lineage


def open_lineage(target: str | None = None, *, token: str | None = None) -> Lineage:
    """None -> $FLASHOPS_LINEAGE_URL if set, else SQLite at $FLASHOPS_HOME/lineage.db (migrated on open);
    sqlite:///... or postgresql+psycopg://... -> direct SQL; http(s)://... -> the HTTP client."""
    target = target or os.environ.get("FLASHOPS_LINEAGE_URL") or None
    if target and target.startswith(("http://", "https://")):
        from flashops.api.lineage.client import HttpLineage

        return HttpLineage(target, token=token)
    if target is None or target.startswith(("sqlite", "postgresql")):
        from flashops.api.lineage.store import SqlLineage

        return SqlLineage(target)
    raise InvalidInput(f"lineage target {target!r}: use sqlite:///PATH, postgresql+psycopg://USER@HOST/DB "
                       "or http(s)://HOST:PORT")
