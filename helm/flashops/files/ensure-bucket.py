"""Wait for the S3 endpoint, then create the flashops bucket if it is missing (idempotent).

Runs as the operator's init container with the same S3 environment every flashops pod gets:
    FLASHOPS_S3_ENDPOINT FLASHOPS_S3_SECURE AWS_REGION FLASHOPS_S3_CA_BUNDLE
    AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY FLASHOPS_S3_BUCKET
    python /scripts/ensure-bucket.py
"""
import os
import sys
import time
from urllib.parse import urlsplit

import urllib3
from minio import Minio

endpoint = os.environ["FLASHOPS_S3_ENDPOINT"]
bucket = os.environ["FLASHOPS_S3_BUCKET"]
parts = urlsplit(endpoint if "://" in endpoint else "//" + endpoint)
secure = os.environ.get("FLASHOPS_S3_SECURE", "true").lower() in ("1", "true", "yes")
if parts.scheme in ("http", "https") and (parts.scheme == "https") != secure:
    sys.exit(f"FLASHOPS_S3_ENDPOINT {endpoint} says {parts.scheme} but FLASHOPS_S3_SECURE={secure}: "
             "make them agree (s3.external.secure in the chart's values)")
ca_bundle = os.environ.get("FLASHOPS_S3_CA_BUNDLE")
http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca_bundle, timeout=10, retries=False) if ca_bundle else None
client = Minio(parts.netloc, access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
               secure=secure, region=os.environ.get("AWS_REGION") or None, http_client=http)

deadline = time.monotonic() + float(os.environ.get("FLASHOPS_S3_WAIT_SECONDS", "300"))
while True:
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
            print(f"created bucket {bucket} at {endpoint}")
        else:
            print(f"bucket {bucket} exists at {endpoint}")
        break
    except Exception as e:  # not up yet, DNS not ready, TLS misconfigured: say which, keep trying
        if time.monotonic() > deadline:
            sys.exit(f"S3 at {endpoint} not usable: {e}")
        print(f"waiting for S3 at {endpoint}: {e}", flush=True)
        time.sleep(3)
