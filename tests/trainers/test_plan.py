"""`flashops plan`: the torch-free arithmetic (flashops.api.plan, what validate and the operator use), the
real sharding on a fake process group (flashops.trainers.plan) and a real 2-process gloo run agree."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flashops.api import plan as arithmetic
from flashops.api.spec import parse_object


def _run(preset="joyai-flash-debug", world=2, ep=2, **training):
    return {"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": f"plan-{preset}"},
            "spec": {"stage": "pretrain", "model": {"preset": preset},
                     "parallelism": {"procsPerNode": world, "ep": ep},
                     "optimizer": {"name": "adamw"},
                     "training": {"steps": 1, "batchSize": 2 * world, "microBatchSize": 2, "seqLen": 64,
                                  **training}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [("float32", 0.10), ("bfloat16", 0.10)])
def test_plan_matches_a_two_process_fsdp_ep_run(tmp_path, dtype, tolerance):
    """Measured per-rank param/grad/optimizer bytes equal the plan's exactly; activations (bytes saved for
    backward in one micro-batch) within `tolerance` of the plan's estimate."""
    from flashops.trainers.plan import model_config, torch_plan

    body = _run(dtype=dtype)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(body))
    worker, port = Path(__file__).with_name("_plan_worker.py"), str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "FLASHOPS_HOME": str(tmp_path / "h")}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(spec_path), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    plan = torch_plan(parse_object(body))
    assert plan.notes == []  # the torch-free arithmetic agrees with the sharded meta model
    for key in ("params", "grads", "optimizer"):
        assert measured[0][key] == getattr(plan.per_rank, key), (key, measured[0], plan.per_rank)
    # on CPU, attention runs torch's unfused SDPA kernel, which keeps the L x S probabilities instead of
    # flash's output + log-sum-exp: the plan's activation count with that kernel
    cfg = model_config(parse_object(body))
    want = arithmetic.memory_per_rank(cfg, **arithmetic.layout(parse_object(body).spec),
                                      attention_kernel="math").activations
    got = measured[0]["activations"]
    print(f"{dtype}: activations measured {got} B, planned {want} B ({got / want - 1:+.1%})")
    assert abs(got / want - 1) < tolerance, (got, want)


def test_arithmetic_counts_every_parameter_and_matches_the_hand_calculation():
    from flashops.model.config import get_config

    for preset in ("joyai-flash-debug", "joyai-flash-small", "joyai-flash-48b-a3b"):
        cfg = get_config(preset)
        counts = cfg.param_counts()
        assert sum(t.numel for t in arithmetic.parameter_tensors(cfg)) == counts["total_params"] + counts["mtp_params"]
    cfg = get_config("joyai-flash-48b-a3b")
    n = sum(t.numel for t in arithmetic.parameter_tensors(cfg))
    for world in (8, 64):
        mem = arithmetic.memory_per_rank(cfg, world_size=world, ep=8, seq_len=4096)
        hand = 16 * n / world  # fp32 weights + grads + two Adam moments, sharded over every rank
        assert abs((mem.params + mem.grads + mem.optimizer) / hand - 1) < 0.001  # FSDP's padding only


def test_plan_cli_says_8_gpus_do_not_fit_the_48b_model_and_64_do():
    from typer.testing import CliRunner

    from flashops.cli.app import app

    spec = Path(__file__).parents[2] / "examples" / "pretrain-48b.yaml"
    runner = CliRunner()
    eight = runner.invoke(app, ["plan", "-f", str(spec), "--gpus", "8", "--gpu-memory", "80GiB", "--json",
                                "--arithmetic-only"])
    assert eight.exit_code == 1, eight.output
    run = json.loads(eight.stdout)["runs"][0]
    assert run["name"] == "pretrain-48b" and run["world_size"] == 8 and run["fits"] is False
    assert set(run["per_rank_bytes"]) == {"params", "grads", "optimizer", "activations", "total"}
    assert "GPUs" in run["fix"]
    sixty_four = runner.invoke(app, ["plan", "-f", str(spec), "--gpu-memory", "80GiB", "--arithmetic-only"])
    assert sixty_four.exit_code == 0 and "64 ranks" in sixty_four.stdout and ": fits" in sixty_four.stdout
    bad = runner.invoke(app, ["plan", "-f", str(spec), "--gpu-memory", "80 gigs"])
    assert bad.exit_code == 2 and "80GiB" in bad.output
