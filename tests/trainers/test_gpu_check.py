"""benchmarks/gpu_check.sh on a machine without a GPU: says so and exits 0 (the GPU path itself runs only
where a GPU is lent; its figures go in the issue note)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ON_CPU"}
    out = subprocess.run(["bash", str(SCRIPT)], env={**env, "PYTHON": sys.executable, "WORK": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no GPU on this machine" in out.stdout and "was not run" in out.stdout
    missing = subprocess.run(["bash", str(SCRIPT)], env={**env, "PYTHON": str(tmp_path / "no-python")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 0 and "not found" in missing.stdout


@pytest.mark.slow  # ~20 s of CPU (about 80 s wall on the loaded 2-core box): a stand-in and 16 tiny decodes
def test_gpu_check_serving_step_dry_run_on_cpu_prints_the_runtime_figures(tmp_path):
    """The serving step (issue 14 item 5) on the CPU (GPU_CHECK_ON_CPU=1): the flashops runtime at batch 1 and 8,
    k = 0..3, run from the source tree; on a GPU the same step runs with --device cuda --dtype bfloat16."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SERVE_MODEL")}
    env.update(PYTHON=sys.executable, WORK=str(tmp_path), GPU_CHECK_ON_CPU="1", GPU_CHECK_STEPS="serve",
               SERVE_PRESET="joyai-flash-debug", SERVE_TRAIN_STEPS="2", DECODE_TOKENS="4", ROUNDS="1", THREADS="1")
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "with the flashops runtime on cpu in float32" in out.stdout and "serving FAILED" not in out.stdout
    figures = json.loads((tmp_path / "serving.json").read_text())
    assert figures["dtype"] == "float32" and figures["device"].startswith("CPU")
    for b in (1, 8):
        line = next(l for l in out.stdout.splitlines() if l.startswith(f"[gpu_check]   batch {b}: "))
        assert [f"k={k} " in line for k in range(4)] == [True] * 4
        assert figures[f"b{b}_k0"]["speedup"] == 1.0
        for k in range(4):
            r = figures[f"b{b}_k{k}"]
            assert r["tokens_per_s"] > 0 and r["acceptance_length"] >= 1.0 and r["speedup"] > 0
    bogus = subprocess.run(["bash", str(SCRIPT)], env={**env, "GPU_CHECK_STEPS": "serv"}, capture_output=True,
                           text=True, timeout=60)
    assert bogus.returncode == 2 and "names no step" in bogus.stdout


@pytest.mark.slow  # ~35 s on 2 cores: the device probe, every stage on the debug model, 10 steps, resume, export
def test_gpu_check_training_step_dry_run_on_cpu_trains_every_stage_where_it_checks(tmp_path):
    """The training step on the CPU (GPU_CHECK_ON_CPU=1): the two-step device probe, then pretrain -> SFT ->
    DPO -> RL on the debug model, each read back from the pipeline's summary as trained on the expected device,
    then the timed run, the resume and the export. Its probe has 2 steps where the run warms up for 2 (it must
    not inherit the warm-up). On a GPU the same steps must report cuda."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=sys.executable, WORK=str(tmp_path), GPU_CHECK_ON_CPU="1", GPU_CHECK_STEPS="train", STEPS="10",
               PRESET="joyai-flash-debug", BATCH="2", SEQ="32")
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("pretrain", "sft", "dpo", "rl"):
        line = next(l for l in out.stdout.splitlines() if l.startswith(f"[gpu_check] stage {stage}: "))
        assert "steps on cpu, final loss" in line
    assert "every stage trained on cpu" in out.stdout and "resumed at step 5" in out.stdout
    summary = json.loads((tmp_path / "stages.json").read_text().splitlines()[-1])
    assert [r["device"] for r in summary["runs"]] == ["cpu"] * 4
