#!/usr/bin/env bash
# The GPU path, checked where a GPU is lent (issue 20). One prepared script, under 8 minutes on one GPU:
#   0. checks that the trainer's steps run on the GPU: two steps, then every stage (pretrain, SFT, DPO, RL) on
#      the debug model, a few steps each;
#   1. trains joyai-flash-small in bf16 (fp32 weights) with the MTP loss and INT4 QAT on, a few hundred steps;
#   2. kills nothing but deletes the final checkpoint and runs again: it resumes from the last saved one and
#      must end on the same loss;
#   3. exports the final checkpoint (full precision + INT4 experts), then serves the export with the flashops
#      runtime's engine on the GPU in bf16 (weights and KV cache on the device): batch 1 and 8, MTP k = 0..3,
#      and INT4 against full precision (benchmarks/serving_decode.py --device cuda --dtype bfloat16);
#   4. prints training tokens/s and MFU, decoding tokens/s, acceptance length and speedup per batch and k.
#
#     bash benchmarks/gpu_check.sh                 # from the repository root, any python3 with torch + CUDA
#     PYTHON=/opt/conda/bin/python STEPS=300 bash benchmarks/gpu_check.sh
#     GPU_CHECK_STEPS=serve SERVE_MODEL=file:///.../models/chat/v1 bash benchmarks/gpu_check.sh   # serving only
#
# GPU_CHECK_STEPS (default "train,serve"): "serve" alone serves SERVE_MODEL, or without it a stand-in of
# SERVE_PRESET (default joyai-flash-small) trained for SERVE_TRAIN_STEPS by serving_decode.py itself.
#
# It runs from the source tree (a PYTHONPATH shim maps api/, model/, ... into `flashops`), with whatever torch
# and libraries the machine has: nothing is installed. It says what it could not run and why. On a machine
# without a GPU it says so and exits 0. Exit 1 only when a step that could run failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-300}"
PRESET="${PRESET:-joyai-flash-small}"
BATCH="${BATCH:-16}"
SEQ="${SEQ:-512}"
# GPU_CHECK_ON_CPU=1: run the same steps on the CPU (a dry run of this script itself, e.g. STEPS=4
# PRESET=joyai-flash-debug BATCH=2 SEQ=64); the figures then mean nothing
WORK="${WORK:-$(mktemp -d -t flashops-gpu-check-XXXXXX)}"
GPU_CHECK_STEPS="${GPU_CHECK_STEPS:-train,serve}"
case ",$GPU_CHECK_STEPS," in *,train,*) DO_TRAIN=1 ;; *) DO_TRAIN=0 ;; esac
case ",$GPU_CHECK_STEPS," in *,serve,*) DO_SERVE=1 ;; *) DO_SERVE=0 ;; esac
if [ "$DO_TRAIN$DO_SERVE" = "00" ]; then
  printf '[gpu_check] GPU_CHECK_STEPS=%s names no step: use train, serve or train,serve\n' "$GPU_CHECK_STEPS"; exit 2
fi
if [ "${GPU_CHECK_ON_CPU:-}" = 1 ]; then DEVICE=cpu DTYPE=float32; else DEVICE=cuda DTYPE=bfloat16; fi
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))
say() { printf '[gpu_check] %s\n' "$*"; }
skipped=()

# ---- 0. is there a GPU, and what can run here --------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  say "no GPU check: $PYTHON not found (set PYTHON=/path/to/python3)"; exit 0
fi
gpu="$("$PYTHON" - <<'EOF' 2>/dev/null
try:
    import torch
except Exception as e:
    print(f"none: torch cannot be imported ({type(e).__name__}: {e})")
else:
    import os
    if os.environ.get("GPU_CHECK_ON_CPU") == "1":
        print(f"ok: CPU dry run (GPU_CHECK_ON_CPU=1), torch {torch.__version__}")
    elif torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"ok: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
    else:
        print(f"none: torch {torch.__version__} sees no CUDA device")
EOF
)"
case "$gpu" in
  ok:*) say "GPU: ${gpu#ok: }" ;;
  *) say "no GPU on this machine (${gpu#none: }): the GPU path was not run. Run this script where a GPU is lent."
     exit 0 ;;
esac

# the source tree as the `flashops` package, without installing it
SHIM="$WORK/src/flashops"
mkdir -p "$SHIM"
for d in api model trainers serving operator storage cli; do ln -sfn "$ROOT/$d" "$SHIM/$d"; done
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
# A torch older than the pin (the lent H200 image had 2.11 on 2026-12-04): torchtitan 0.3.0 imports
# torch.distributed.fsdp.DataParallelMeshDims (torch >= 2.12) at module level, for the MTP layer's FSDP
# sharding, which one process never runs. Where it is missing, a placeholder class, set in every python this
# script starts, lets the imports through; using it raises. Remove when the GPU image has the pinned torch (2.13).
if ! "$PYTHON" -c "from torch.distributed.fsdp import DataParallelMeshDims" 2>/dev/null; then
  say "this torch has no torch.distributed.fsdp.DataParallelMeshDims (torch >= 2.12; the pin is 2.13): a placeholder"
  say "  lets torchtitan 0.3.0 import; one process never uses it"
  cat > "$WORK/src/sitecustomize.py" <<'EOF'
try:
    import torch.distributed.fsdp as _fsdp
    if not hasattr(_fsdp, "DataParallelMeshDims"):
        class DataParallelMeshDims:  # placeholder: see benchmarks/gpu_check.sh
            def __init__(self, *args, **kwargs):
                raise RuntimeError("DataParallelMeshDims needs torch >= 2.12 (the pin is 2.13)")
        _fsdp.DataParallelMeshDims = DataParallelMeshDims
except ImportError:
    pass
EOF
fi
export FLASHOPS_HOME="$WORK/home" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}" PRESET

missing="$("$PYTHON" - <<'EOF'
import importlib
need = ["torchtitan", "torchao", "safetensors", "tokenizers", "pydantic", "yaml", "typer", "rich", "sqlalchemy",
        "alembic", "numpy", "pyarrow"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ]; then
  say "cannot train or serve here: missing Python packages: $missing (this script installs nothing;"
  say "  bring them as wheels or use an image with the pinned set from constraints.txt)"
  say "the GPU path was NOT run"
  exit 0
fi
if ! "$PYTHON" -c "import flashops.trainers.engine, flashops.serving.backend" 2>"$WORK/import.log"; then
  say "cannot import flashops from the source tree with this torch/torchtitan (see below); the GPU path was NOT run"
  tail -5 "$WORK/import.log" | sed 's/^/    /'
  exit 0
fi

second='{}'
train_failed=0
step_failed() { say "$1 FAILED:"; tail -20 "$2" | sed 's/^/    /'; exit 1; }  # a step that could run and failed

train() {
# ---- 1. train: bf16 compute, MTP + QAT -----------------------------------------------------------------
SPEC="$WORK/spec.yaml"
half=$((STEPS / 2))
warmup=$((STEPS / 5 < 20 ? STEPS / 5 : 20))
cat > "$SPEC" <<EOF
apiVersion: flashops.dev/v1alpha1
kind: TrainingRun
metadata: {name: gpu-check}
spec:
  stage: pretrain
  model: {preset: $PRESET}
  data: {uri: "builtin:pretrain-text"}
  optimizer: {name: adamw, lr: 1.0e-3, schedule: wsd, warmupSteps: $warmup}
  training: {steps: $STEPS, batchSize: $BATCH, seqLen: $SEQ, dtype: bfloat16, activationCheckpointing: none}
  pretrain: {mtpWeight: 0.1, mtpFromStep: 0}
  qat: {mode: int4, groupSize: 64}
  checkpoint: {every: $half, keep: 3, uri: "file://$WORK/store"}
EOF
# where does the one-process trainer put its steps? Two steps of the same spec first: on the CPU, the
# run below would measure the CPU (as on 2026-12-04, the first run on an H200: docs/scale.md)
sed -e "s/steps: $STEPS,/steps: 2,/" -e "s/warmupSteps: $warmup}/warmupSteps: 0}/" -e "s|$WORK/store|$WORK/probe-store|" -e "s/name: gpu-check}/name: gpu-check-device}/" \
  "$SPEC" > "$WORK/probe.yaml"
if ! "$PYTHON" -m flashops.trainers --spec "$WORK/probe.yaml" --no-export > "$WORK/probe.json" 2> "$WORK/probe.err"; then
  step_failed training "$WORK/probe.err"
fi
ran_on="$("$PYTHON" -c "import json,sys; print(json.loads(sys.argv[1]).get('device'))" "$(tail -1 "$WORK/probe.json")")"
if [ "$ran_on" != "$DEVICE" ]; then
  say "training FAILED: the trainer ran its steps on '$ran_on', not on '$DEVICE' (docs/scale.md, \"The first"
  say "  run on a GPU\"); not timing them. Serving places its own model."
  train_failed=1; return
fi
# every stage's batches on the device: pretrain -> SFT -> DPO -> RL (rollouts, KL reference, nllWeight, MTP) on
# the debug model, a few steps each, one process
cat > "$WORK/stages.yaml" <<EOF
apiVersion: flashops.dev/v1alpha1
kind: TrainingPipeline
metadata: {name: gpu-check-stages}
spec:
  stages:
    - {name: pretrain, spec: {stage: pretrain, model: {preset: joyai-flash-debug}, data: {uri: "builtin:pretrain-text"},
       optimizer: {name: muon, lr: 3.0e-3, warmupSteps: 2}, training: {steps: 6, batchSize: 8, seqLen: 64, dtype: $DTYPE},
       pretrain: {mtpWeight: 0.1, mtpFromStep: 0}}}
    - {name: sft, spec: {stage: sft, data: {uri: "builtin:sft-chat"}, optimizer: {name: adamw, lr: 1.0e-3},
       training: {steps: 3, batchSize: 8, seqLen: 64, dtype: $DTYPE}, sft: {thinkingRatio: 0.5}}}
    - {name: dpo, spec: {stage: dpo, data: {uri: "builtin:dpo-pairs"}, optimizer: {name: adamw, lr: 1.0e-4},
       training: {steps: 3, batchSize: 4, seqLen: 64, dtype: $DTYPE}, dpo: {beta: 0.1, nllWeight: 1.0}}}
    - {name: rl, spec: {stage: rl, data: {uri: "builtin:rl-tasks"}, optimizer: {name: adamw, lr: 1.0e-5},
       training: {steps: 3, seqLen: 64, dtype: $DTYPE},
       rl: {groupSize: 4, promptsPerStep: 4, updatesPerBatch: 2, thinkingRatio: 0.5, maxNewTokens: 8, nllWeight: 1.0,
            klCoef: 0.01, curriculum: {profileRollouts: 2, profileMaxPrompts: 8}}}}
EOF
t_stages=$SECONDS
if ! "$PYTHON" -m flashops.trainers --spec "$WORK/stages.yaml" --no-export > "$WORK/stages.json" 2> "$WORK/stages.err"; then
  step_failed "the stages (pretrain, sft, dpo, rl)" "$WORK/stages.err"
fi
"$PYTHON" - "$(tail -1 "$WORK/stages.json")" "$DEVICE" "$((SECONDS - t_stages))" <<'EOF' || exit 1
import json, math, sys
runs, device = json.loads(sys.argv[1])["runs"], sys.argv[2]
for r in runs:
    print(f"[gpu_check] stage {r['stage']}: {r['steps']} steps on {r['device']}, final loss {r['loss']:.4f}")
bad = [r["stage"] for r in runs if r["device"] != device or not math.isfinite(r["loss"])]
if [r["stage"] for r in runs] != ["pretrain", "sft", "dpo", "rl"] or bad:
    print(f"[gpu_check] stages FAILED: {bad or [r['stage'] for r in runs]} did not train on {device} to a finite loss")
    sys.exit(1)
print(f"[gpu_check] every stage trained on {device} ({sys.argv[3]}s with start-up)")
EOF
say "training $PRESET: $STEPS steps of $BATCH x $SEQ tokens, bf16 compute, MTP + INT4 QAT (one process:"
say "  autocast; FSDP2's bf16 MixedPrecisionPolicy needs 2+ processes and is not exercised on one GPU)"
if ! "$PYTHON" -m flashops.trainers --spec "$SPEC" --log-dir "$WORK/logs1" --no-export > "$WORK/train1.json" 2> "$WORK/train1.err"; then
  step_failed training "$WORK/train1.err"
fi
first="$(tail -1 "$WORK/train1.json")"
say "trained: $first"

# ---- 2. resume: drop the final checkpoint, run again, same final loss --------------------------------------
rm -rf "$WORK/store/runs/gpu-check/step-$STEPS"
if ! "$PYTHON" -m flashops.trainers --spec "$SPEC" --log-dir "$WORK/logs2" > "$WORK/train2.json" 2> "$WORK/train2.err"; then
  step_failed resume "$WORK/train2.err"
fi
second="$(tail -1 "$WORK/train2.json")"
"$PYTHON" - "$first" "$second" "$WORK" <<'EOF' || exit 1
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = [json.loads(l) for l in open(f"{sys.argv[3]}/logs2/metrics.jsonl")]
print(f"[gpu_check] resumed at step {rows[0]['step'] - 1}: final loss {b['loss']:.5f} vs uninterrupted {a['loss']:.5f}")
if abs(a["loss"] - b["loss"]) > 2e-2:  # GPU kernels are not bit-deterministic
    print("[gpu_check] resume FAILED: the resumed run ends on another loss"); sys.exit(1)
print(f"[gpu_check] exported: {b.get('model')}")
EOF

# ---- training throughput and MFU ---------------------------------------------------------------------------
"$PYTHON" - "$WORK" <<'EOF'
import json, sys, statistics
import torch
from flashops.model.config import get_config
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/logs1/metrics.jsonl")]
tps = statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 5:])  # past warm-up
import os
cfg = get_config(os.environ.get("PRESET", "joyai-flash-small"))
active = cfg.param_counts()["active_params_with_embeddings"] + cfg.param_counts()["mtp_params"]
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
peak = next((v for k, v in peaks.items() if k in name), None)
flops = 6 * active * tps  # forward + backward matmul FLOPs per token (attention scores left out)
mfu = f"{flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "unknown (no peak figure for this GPU)"
print(f"[gpu_check] training: {tps:,.0f} tokens/s (median), {flops / 1e12:.1f} TFLOP/s, MFU {mfu}")
EOF
}
if [ "$DO_TRAIN" = 1 ]; then train; fi

# ---- 3. the flashops runtime on the GPU: batch 1 and 8, MTP k = 0..3, full precision and INT4 ------------
if [ "$DO_SERVE" = 1 ]; then
  model_uri="${SERVE_MODEL:-$("$PYTHON" -c "import json,sys; print(json.loads(sys.argv[1]).get('model') or '')" "$second")}"
  source_args=(--model "$model_uri")
  if [ -z "$model_uri" ] && { [ "$DO_TRAIN" = 0 ] || [ "$train_failed" = 1 ]; }; then  # no export: a stand-in
    source_args=(--preset "${SERVE_PRESET:-joyai-flash-small}")
    if [ -n "${SERVE_TRAIN_STEPS:-}" ]; then source_args+=(--train-steps "$SERVE_TRAIN_STEPS"); fi
  fi
  left=$((DEADLINE - SECONDS))
  if [ "${source_args[0]}" = --model ] && [ -z "$model_uri" ]; then
    say "no export URI in the trainer's summary: serving not run"; skipped+=("serving")
  elif [ "$left" -lt 60 ]; then
    say "serving not run: ${left}s left of the time budget"; skipped+=("serving")
  else
    say "serving (${source_args[*]}) with the flashops runtime on $DEVICE in $DTYPE: batch 1 and 8, MTP k = 0..3, INT4"
    if ! timeout "$left" "$PYTHON" "$ROOT/benchmarks/serving_decode.py" "${source_args[@]}" --device "$DEVICE" \
         --dtype "$DTYPE" --tokens "${DECODE_TOKENS:-64}" --rounds "${ROUNDS:-3}" --threads "${THREADS:-4}" \
         --json "$WORK/serving.json" 2> "$WORK/serve.err"; then
      say "serving FAILED or ran out of time:"; tail -10 "$WORK/serve.err" | sed 's/^/    /'; skipped+=("serving")
    fi
    # the issue's figures from the JSON (written right after the MTP table, so they survive an INT4 failure)
    if [ -s "$WORK/serving.json" ]; then
      "$PYTHON" - "$WORK/serving.json" <<'EOF' || skipped+=("serving summary")
import json, sys
r = json.load(open(sys.argv[1]))
print(f"[gpu_check] flashops runtime on {r['device']} ({r['dtype']}): tokens/s, acceptance length, speedup vs k=0")
for b in (1, 8):
    cells = [f"k={k} {r[f'b{b}_k{k}']['tokens_per_s']:,.0f} tok/s, {r[f'b{b}_k{k}']['acceptance_length']:.2f}, "
             f"{r[f'b{b}_k{k}']['speedup']:.2f}x" for k in range(4)]
    print(f"[gpu_check]   batch {b}: " + "; ".join(cells))
EOF
    fi
  fi
fi

if [ ${#skipped[@]} -gt 0 ]; then say "not run: ${skipped[*]}"; fi
say "done in ${SECONDS}s; work directory $WORK"
if [ "$train_failed" = 1 ]; then exit 1; fi
