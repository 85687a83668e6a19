"""Training throughput on CPU: forward + backward + AdamW tokens/s and peak memory, flashops' JoyAIFlash vs
Hugging Face transformers' DeepseekV3 (same configuration, same weights layout) vs torchtitan's own
deepseek_v3 debug model. Each measurement runs in a fresh process (so peak RSS is its own), and the
implementations alternate A B C A B C ... so machine drift shows up as spread, not as a bias.

    .venv/bin/python benchmarks/model_throughput.py                 # debug, small and the torchtitan debug config
    .venv/bin/python benchmarks/model_throughput.py --rounds 3 --steps 5 --batch 2 --seq 256 --threads 2
    .venv/bin/python benchmarks/model_throughput.py --configs tt-debug --default-malloc
    FLASHOPS_CPU_MATMUL=aten .venv/bin/python benchmarks/model_throughput.py --configs tt-debug   # torch's kernels

flashops' CPU kernels are the ones flashops.model.cpu_kernels measured on this machine (cached per CPU model in
$FLASHOPS_HOME/cpu_kernels.json; the header prints the choice).

Every implementation runs with the same optimizer (torch's fused AdamW, what the flashops trainer uses) and the
same allocator settings (trainers/cpu_allocator.py: glibc keeps freed memory; --default-malloc turns that off
for all of them). "flashops+mtp" also trains the MTP layer, work the others do not do: not a like-for-like row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# torchtitan's debugmodel (33M) expressed as a JoyAIConfig: same shapes, so all three are comparable.
TT_DEBUG = dict(preset="tt-debug", vocab_size=2048, dim=256, n_layers=6, n_dense_layers=1, dense_hidden_dim=1024,
                n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                v_head_dim=128, num_experts=8, top_k=3, num_shared_experts=2, moe_hidden_dim=256, max_seq_len=4096)


def _config(name):
    from flashops.model.config import JoyAIConfig, get_config

    return JoyAIConfig(**TT_DEBUG).validate() if name == "tt-debug" else get_config(name)


def _build(impl, cfg_name):
    """(model, step_loss_fn(tokens) -> loss)."""
    import torch
    import torch.nn.functional as F

    if impl == "torchtitan":
        from torchtitan.models.deepseek_v3 import deepseekv3_configs

        # torch 2.13 has no flex-attention backward on CPU (eager or compiled), so torchtitan's model cannot
        # train here as shipped. Closest faithful stand-in: flex's unfused semantics, i.e. the block mask's
        # mask_mod materialised densely and applied in SDPA (what eager flex does in forward).
        from torch.nn.attention.flex_attention import create_mask
        from torchtitan.models.common.attention import FlexAttention

        def unfused_flex(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
            mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[2], k.shape[2], device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None

        FlexAttention._compiled_flex_attn = staticmethod(unfused_flex)
        model = deepseekv3_configs["debugmodel"](attn_backend="flex", moe_comm_backend="standard").build()
        model.init_states()

        def loss_fn(tokens):
            positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
            logits = model(tokens[:, :-1], positions[:, :-1], model.get_attention_masks(positions[:, :-1]))
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        return model, loss_fn, 2048
    cfg = _config(cfg_name)
    if impl == "transformers":
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        from flashops.model.hf import hf_config_dict

        data = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("flashops", "architectures")}
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**data))

        def loss_fn(tokens):
            logits = model(tokens[:, :-1]).logits
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

        return model, loss_fn, cfg.vocab_size
    from flashops.model import JoyAIFlash

    model = JoyAIFlash(cfg)
    with_mtp = impl == "flashops+mtp"

    def loss_fn(tokens):
        out = model(tokens[:, :-1], mtp=with_mtp)
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        if with_mtp:
            loss = loss + 0.1 * F.cross_entropy(out.mtp_logits[:, 1:].flatten(0, 1), tokens[:, 2:].flatten())
        return loss

    return model, loss_fn, cfg.vocab_size


def measure_one(impl, cfg_name, batch, seq, steps, warmup, threads, min_seconds=3.0):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, loss_fn, vocab = _build(impl, cfg_name)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the kernel flashops' trainer uses, for all
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    times = []
    i = 0
    while i < warmup + steps or sum(times) < min_seconds:  # short steps: measure at least min_seconds
        i += 1
        t0 = time.perf_counter()
        loss = loss_fn(tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "update_router_bias"):
            model.update_router_bias()
        if i > warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"tok_s": batch * seq / statistics.median(times), "peak_mib": (peak - base_rss) / 1024,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if impl.startswith("flashops"):  # the kernels this process measured (or read from the per-CPU cache)
        from flashops.model.cpu_kernels import kernels

        out["kernels"] = kernels().describe()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="tt-debug,joyai-flash-debug,joyai-flash-small")
    ap.add_argument("--impls", default="", help="only these, e.g. flashops,transformers (default: all that apply)")
    ap.add_argument("--variants", nargs="*", default=[], metavar="ENV",
                    help="extra flashops rows under CPU kernel overrides, e.g. FLASHOPS_CPU_MATMUL=aten "
                         "FLASHOPS_CPU_MATMUL=onednn,FLASHOPS_CPU_ATTENTION=mla")
    ap.add_argument("--default-malloc", action="store_true",
                    help="glibc's default allocator settings (memory handed back to the OS and refaulted every step)")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.batch, args.seq, args.steps, args.warmup, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    if not args.default_malloc:  # the same allocator settings for every implementation (trainers/cpu_allocator.py)
        from flashops.trainers.cpu_allocator import ENV as MALLOC_ENV

        env.update(MALLOC_ENV)
    results = {}
    for cfg_name in args.configs.split(","):
        impls = ["flashops", "transformers"] + (["torchtitan"] if cfg_name == "tt-debug" else ["flashops+mtp"])
        impls = [i for i in impls if not args.impls or i in args.impls.split(",")]
        impls += [f"flashops[{v}]" for v in args.variants]
        for r in range(args.rounds):
            for impl in impls:  # A B C A B C: drift shows as spread
                cmd = [sys.executable, __file__, "--one", impl, cfg_name, "--batch", str(args.batch), "--seq",
                       str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
                       str(args.threads)]
                variant = impl[len("flashops["):-1] if impl.startswith("flashops[") else ""
                run_env = {**env, **dict(kv.split("=", 1) for kv in variant.split(",") if kv)}
                out = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
                if out.returncode:
                    print(f"{impl} {cfg_name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                res = {**json.loads(out.stdout.strip().splitlines()[-1]), "round": r}
                results.setdefault((cfg_name, impl), []).append(res)
                print(f"  round {r + 1} {cfg_name:18s} {impl:13s} {res['tok_s']:8.0f} tok/s  {res['peak_mib']:7.0f} MiB",
                      file=sys.stderr)
    from flashops.model.cpu_kernels import cpu_model

    kernel_lines = sorted({r["kernels"] for rs in results.values() for r in rs if "kernels" in r})
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} CPUs visible; flashops' " + ("; ".join(kernel_lines) or "-"))
    print(f"fwd+bwd+AdamW (fused) on CPU, fp32, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"{args.rounds} alternating rounds (median of >= {args.steps} steps and >= 3 s each), "
          f"{'default glibc malloc' if args.default_malloc else 'malloc keeping freed memory (same for all)'}\n")
    print("vs transformers: 'paired' = median over rounds of (this / transformers in the same round, run back to")
    print("back), the least drift-sensitive figure on a shared machine; 'best' = best round / best round.\n")
    print(f"{'config':18s} {'implementation':14s} {'params':>8s} {'tok/s median':>13s} {'min..max':>15s} "
          f"{'peak MiB':>9s} {'paired (range)':>20s} {'best':>7s}")
    print("(flashops+mtp: main + 0.1 x MTP loss, an extra block the others do not run)")
    for cfg_name in args.configs.split(","):
        hf = results.get((cfg_name, "transformers"))
        for (c, impl), rs in results.items():
            if c != cfg_name:
                continue
            toks = [r["tok_s"] for r in rs]
            hf_round = {h["round"]: h["tok_s"] for h in hf or []}
            paired = [r["tok_s"] / hf_round[r["round"]] for r in rs if r["round"] in hf_round]
            paired_s = (f"{statistics.median(paired):.2f}x ({min(paired):.2f}..{max(paired):.2f})" if paired else "-")
            best = f"{max(toks) / max(h['tok_s'] for h in hf):.2f}x" if hf else "-"
            print(f"{c:18s} {impl:14s} {rs[0]['params_m']:7.1f}M {statistics.median(toks):13.0f} "
                  f"{min(toks):7.0f}..{max(toks):<7.0f} {max(r['peak_mib'] for r in rs):9.0f} {paired_s:>20s} {best:>7s}")

if __name__ == "__main__":
    main()
