"""Suite-wide setup. Shared fixtures live in tests/fixtures/*.py (one module per real service:
S3 server, PostgreSQL, Kubernetes API emulator, ...) and are registered here as plugins."""
import os
from pathlib import Path

# Keep torch from fighting pytest for the two cores, and keep user state out of ~/.flashops.
os.environ.setdefault("OMP_NUM_THREADS", "2")

_FIXTURES = Path(__file__).parent / "fixtures"
pytest_plugins = sorted(
    f"fixtures.{p.stem}" for p in _FIXTURES.glob("*.py") if not p.name.startswith("_")
)

REPO_ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_CRDS = _FIXTURES / "crds"
