"""Multi-process save and load at another world size (real gloo process groups, the real S3 server):
expert weights sharded on the expert dim must land on the rank that owns them after resharding."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashops.storage import open_store

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_save_at_two_ranks_load_at_three_and_one_keeps_experts_in_place(s3_uri, s3_env):
    env = {**os.environ, **s3_env.env(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKER), "reshard", s3_uri, "2", "3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 2 of 3 holds experts [6, 7] (saved at world size 2)" in r.stdout, r.stdout

    store = open_store(s3_uri)
    ref = store.latest("ep")
    manifest = store.read_manifest(ref)
    assert manifest["world_size"] == 2
    # each rank wrote its own shard files, rank 0 also DCP's .metadata; all are in the manifest
    assert any(k.startswith("__0_") for k in manifest["objects"]) and any(k.startswith("__1_") for k in manifest["objects"])
    store.verify(ref)

    # world size 1, plain tensors: the consolidated weight is the original, expert by expert
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import NUM_EXPERTS, expected_experts

    full = {"layers.1.moe.experts.w1": torch.zeros(NUM_EXPERTS, 4, 2),
            "layers.1.moe.router.expert_bias": torch.zeros(NUM_EXPERTS), "layers.0.ffn.w": torch.zeros(3, 3)}
    meta = store.load_checkpoint(ref, full)
    assert meta.world_size == 2 and meta.extra == {"world": 2}
    assert torch.equal(full["layers.1.moe.experts.w1"], expected_experts())
    assert full["layers.1.moe.router.expert_bias"].tolist() == list(map(float, range(NUM_EXPERTS)))
    # the export's reader: one tensor at a time, its chunks ranged-read from both ranks' shard files
    tensors = store.open_tensors(ref)
    assert set(tensors.entries()) == set(full)
    for key, value in full.items():
        assert torch.equal(tensors.read(key), value), key


@pytest.mark.slow
def test_async_failure_on_one_rank_is_raised_on_every_rank_at_the_same_step(s3_uri, s3_env):
    """Rank 1's background upload fails; both ranks keep training (a collective per step) and both raise
    the same CredentialsError at the same step; step 1 stays the latest complete checkpoint."""
    env = {**os.environ, **s3_env.env(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKER), "async-fail", s3_uri, "2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Two processes share one stdout pipe, so their lines can interleave mid-line: match, do not split lines.
    raised = sorted(re.findall(r"rank \d raised (\w+ at step \d+)", r.stdout))
    assert len(raised) == 2 and raised[0] == raised[1], r.stdout  # same type, same step
    assert raised[0].startswith("CredentialsError at step "), r.stdout
    assert open_store(s3_uri).latest("async-fail").step == 1
