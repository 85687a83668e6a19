"""Wait for the S3 endpoint, then create the flashops bucket if it is missing (idempotent).

The operator's init container. It reaches the store exactly as every flashops pod does, through
flashops.storage and the same environment (FLASHOPS_S3_ENDPOINT, FLASHOPS_S3_SECURE, FLASHOPS_S3_CA_BUNDLE,
AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), so a wrong endpoint, TLS setting or key fails
here, named, before the operator starts handing it to trainers.

    FLASHOPS_S3_BUCKET=flashops python /scripts/ensure-bucket.py
"""
import os
import sys
import time

from flashops.storage import open_store
from flashops.storage.errors import EndpointUnreachableError, StoreError

bucket = os.environ["FLASHOPS_S3_BUCKET"]
deadline = time.monotonic() + float(os.environ.get("FLASHOPS_S3_WAIT_SECONDS", "300"))
try:
    store = open_store(f"s3://{bucket}", create_bucket=True)
    where = f"{bucket} at {store.backend.settings.url}"
    while True:
        try:
            store.backend.ensure_ready(for_write=True)
            break
        except EndpointUnreachableError as e:  # MinIO still starting, or its Service has no endpoints yet
            print(f"waiting for S3: {e}", flush=True)
            if time.monotonic() > deadline:
                raise
            time.sleep(3)
except StoreError as e:  # bad credentials, TLS, endpoint syntax: waiting will not fix these
    sys.exit(f"S3 not usable for bucket {bucket}: {e}")
print(f"bucket {where} is ready")
