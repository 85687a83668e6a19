"""flashops.storage: the checkpoint and model store (file:// and s3://). Torch-free at import; see
store.py for the layout and the guarantees, and docs/architecture.md for the contract.

    from flashops.storage import open_store
    store = open_store("s3://ckpts/team-a")
    ref = store.latest("run-1")
"""
from flashops.storage.errors import (
    AlreadyExistsError,
    BucketMissingError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptObjectError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StoreConfigError,
    StoreError,
    TLSError,
    TransientStoreError,
)
from flashops.storage.store import (
    CheckpointMeta,
    CheckpointRef,
    CheckpointStore,
    GcReport,
    ModelRef,
    ModelWriter,
    VerifyReport,
    default_store_uri,
    fetch_model,
    load_checkpoint,
    open_store,
    exported_model_uri,
    split_checkpoint_uri,
)

__all__ = [
    "AlreadyExistsError", "BucketMissingError", "CheckpointExistsError", "CheckpointMeta", "CheckpointNotFoundError",
    "CheckpointRef", "CheckpointStore", "CorruptObjectError", "CredentialsError", "EndpointUnreachableError",
    "GcReport", "ModelRef", "ModelWriter", "ObjectNotFoundError", "StoreConfigError", "StoreError", "TLSError",
    "TransientStoreError", "VerifyReport", "default_store_uri", "fetch_model", "load_checkpoint", "open_store",
    "exported_model_uri",
    "split_checkpoint_uri",
]
