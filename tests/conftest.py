"""Suite-wide setup. Shared fixtures live in tests/fixtures/*.py (one module per real service:
S3 server, PostgreSQL, Kubernetes API emulator, ...) and are registered here as plugins."""
import os
from pathlib import Path

# Keep torch from fighting pytest for the two cores, and keep user state out of ~/.flashops.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The same CPU kernels on every machine and no timing in each test process: the measured choice
# (flashops.model.cpu_kernels) is tested with injected timings in tests/model/test_cpu_kernels.py.
os.environ.setdefault("FLASHOPS_CPU_MATMUL", "onednn")
os.environ.setdefault("FLASHOPS_CPU_INT4", "int4pack")  # the packed INT4 kernel, as this CPU measured

_FIXTURES = Path(__file__).parent / "fixtures"
pytest_plugins = sorted(
    f"fixtures.{p.stem}" for p in _FIXTURES.glob("*.py") if not p.name.startswith("_")
)

REPO_ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_CRDS = _FIXTURES / "crds"


import pytest  # noqa: E402


@pytest.fixture
def exact_int4(monkeypatch):
    """INT4 experts on the exact (dequantizing, fp32) kernel: for tests of the INT4 file format that compare
    with the fake-quantized model at 1e-4; the bf16 packed kernel is tested in tests/model/test_int4_kernel.py."""
    from flashops.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_int4_choice", cpu_kernels.Int4Choice("dequant", "exact_int4 fixture"))
