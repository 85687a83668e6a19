"""trainers/cpu_allocator.py: after keep_freed_memory(), a training-sized buffer freed and allocated again
is not faulted in again (glibc's default hands it back to the OS every time)."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from flashops.trainers.cpu_allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():
    t = torch.empty(4 << 20)  # 16 MiB, like an expert weight gradient
    t.fill_(1.0)
    del t
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_buffers_stay_mapped():
    default, kept = _faults("default"), _faults("keep")
    assert default > 10 * 1000  # ~4,096 faults per 16 MiB cycle with glibc's defaults
    assert kept < 100
