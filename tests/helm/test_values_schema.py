"""values.schema.json turns bad values into an install-time error that names the value.

    helm template flashops ./helm/flashops --set operator.replicas=two    # -> '/operator/replicas': got string, want integer
"""
from __future__ import annotations

import pytest

from fixtures.helm import CHART, NAMESPACE, run_helm

pytestmark = pytest.mark.helm


def render(*sets: str):
    args = ["template", "flashops", str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    return run_helm(*args, check=False)


@pytest.mark.parametrize(
    "sets, expected",
    [
        # wrong types
        (["operator.replicas=two"], ["/operator/replicas", "got string, want integer"]),
        (["postgresql.enabled=maybe"], ["/postgresql/enabled", "want boolean"]),
        (["lineage.port=70000"], ["/lineage/port", "maximum"]),
        (["runtime=pytorch"], ["/runtime", "'pytorchjob', 'trainjob'"]),
        (["image.flavor=rocm"], ["/image/flavor", "'cpu', 'cuda'"]),
        # a typo is not silently ignored
        (["minio.enabeld=false"], ["/minio", "enabeld"]),
        # external PostgreSQL without a host or any password source
        (["postgresql.enabled=false"], ["/postgresql/external/host", "/postgresql/external/existingSecret",
                                        "/postgresql/external/password"]),
        # external S3 without an endpoint or credentials
        (["minio.enabled=false"], ["/s3/external/endpoint", "/s3/credentials/existingSecret"]),
        (["minio.enabled=false", "s3.external.endpoint=s3.example.com", "s3.credentials.accessKey=only-half"],
         ["/s3/credentials/secretKey"]),
        # a scheme and the TLS switch that disagree (KServe's classic MinIO trap), a CA that is not PEM
        (["minio.enabled=false", "s3.credentials.existingSecret=s3", "s3.external.endpoint=http://minio:9000"],
         ["/s3/external/secure", "value must be false"]),
        (["minio.enabled=false", "s3.credentials.existingSecret=s3", "s3.external.endpoint=https://minio:9000",
          "s3.external.secure=false"], ["/s3/external/secure", "value must be true"]),
        (["minio.enabled=false", "s3.credentials.existingSecret=s3", "s3.external.endpoint=minio:9000",
          "s3.external.caBundle.pem=/etc/ssl/ca.pem"], ["/s3/external/caBundle/pem"]),
        # flashops pods never run as root; one operator at a time
        (["podSecurityContext.runAsNonRoot=false"], ["/podSecurityContext/runAsNonRoot"]),
        (["operator.replicas=2"], ["/operator/replicas", "maximum"]),
        (["checkpointRoot=gs://bucket/x"], ["/checkpointRoot"]),
        (["clientNamespaces[0]=Team_A"], ["/clientNamespaces/0"]),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, list) and "=" in v[0] else None,
)
def test_bad_values_fail_with_a_message_naming_the_value(sets, expected):
    proc = render(*sets)
    assert proc.returncode != 0, f"{sets} rendered: the schema let it through"
    assert "don't meet the specifications of the schema" in proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "sets",
    [
        ["postgresql.enabled=false", "postgresql.external.host=db.example.com", "postgresql.external.password=pw"],
        ["postgresql.enabled=false", "postgresql.external.host=db.example.com", "postgresql.external.existingSecret=pg"],
        ["minio.enabled=false", "s3.external.endpoint=https://s3.example.com", "s3.credentials.existingSecret=s3"],
        ["minio.enabled=false", "s3.external.endpoint=s3.example.com:9000", "s3.external.secure=false",
         "s3.credentials.accessKey=a", "s3.credentials.secretKey=b"],
    ],
)
def test_complete_external_settings_pass(sets):
    proc = render(*sets)
    assert proc.returncode == 0, proc.stderr
