"""manifest.json: the one object that makes a checkpoint (or an exported model) exist.

It is written LAST, after every object it lists is durable, and it records each object's size and
sha256. No manifest means no checkpoint: whatever else is under the prefix is a crashed or running save.
Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from flashops.storage.errors import CorruptObjectError

MANIFEST_NAME = "manifest.json"
CHECKPOINT_FORMAT = "flashops.checkpoint/v1"
MODEL_FORMAT = "flashops.model/v1"
DATASET_FORMAT = "flashops.tokens/v1"  # a prepared (tokenized) dataset: flashops.storage.datasets


@dataclass(frozen=True)
class ObjectEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    fields: dict                      # format, run/step or name/version, created, world_size, meta...
    objects: dict[str, ObjectEntry]   # key relative to the manifest's directory -> size, sha256
    sha256: str = ""                  # of the manifest bytes themselves (the lineage manifest_hash)

    def to_bytes(self) -> bytes:
        doc = dict(self.fields)
        doc["objects"] = {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(self.objects.items())}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.objects.values())

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Manifest":
        try:
            doc = json.loads(data)
            objects = {k: ObjectEntry(int(v["size"]), str(v["sha256"])) for k, v in doc.pop("objects").items()}
            if doc.get("format") not in (CHECKPOINT_FORMAT, MODEL_FORMAT, DATASET_FORMAT):
                raise ValueError(f"unknown format {doc.get('format')!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptObjectError(
                f"{where} is not a valid flashops manifest ({e}); the checkpoint is unusable: delete it "
                "(flashops checkpoints gc) or restore the manifest from a backup",
                key=where,
            ) from e
        return cls(doc, objects, hashlib.sha256(data).hexdigest())
