"""Decode speed of the serving engine: MTP speculative decoding k = 0..3 at batch 1 and 8, and INT4
routed experts against full precision (weight memory and tokens/s). Prints a table; ratios are
against k = 0 (and full precision) measured in the same run.

    .venv/bin/python benchmarks/serving_decode.py                              # debug stand-in (~1 min)
    .venv/bin/python benchmarks/serving_decode.py --preset joyai-flash-small   # small stand-in (~5-10 min)
    .venv/bin/python benchmarks/serving_decode.py --model file:///.../models/chat/v1 --tokens 128
    python benchmarks/serving_decode.py --model URI --device cuda --dtype bfloat16    # on a GPU (gpu_check.sh)
    .venv/bin/python benchmarks/serving_decode.py --only int4 --preset joyai-flash-small --profile   # INT4 vs fp32

Without --model the script trains a stand-in of --preset (MTP on, QAT-free; vocab cut to 512) for
--train-steps steps on a "letter walk" language (next letter with p=0.7, the one after with p=0.3), until
the quickstart pipeline's exported model is available. Its MTP layer learns the walk well, so acceptance
is optimistic. The debug preset's main pass is so cheap that k MTP calls cost about half of it; the small
preset (10 layers, 32 experts) is where the MTP layer is cheap next to the main pass, as in the paper.

Timing: every configuration gets an engine and a warm-up first; then --rounds rounds each decode every
configuration once (k = 0, 1, 2, 3 interleaved), and a speedup is the median over rounds of the ratio
to k = 0 in the same round, so machine drift shows as spread, not bias. --threads defaults to 1: on a
shared 2-core machine two intra-op threads are 5-7x slower for batch-1 decoding (one thread waits on the
other's preempted half), which swamped every ratio.

INT4 (issue 14 item 3; target: >= 1.3x fp32 tokens/s at batch 1): the routed experts run on torch's packed
CPU INT4 matmul (flashops.model.export.Int4Experts, kernel chosen per CPU by flashops.model.cpu_kernels).
`--profile` splits a batch-1 decode step (model forward + logits, no engine) into routed experts, router,
shared experts, attention, dense MLPs, lm_head and the rest (embedding, norms, MoE dispatch, KV-cache
bookkeeping, Python), for fp32 and INT4, from interleaved steps. The header names the CPU and the load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import string
import tempfile
import time
from pathlib import Path

import torch

from flashops.serving.backend import JoyAIBackend, place
from flashops.serving.engine import Engine
from flashops.serving.metrics import ModelMetrics
from flashops.serving.sampling import SamplingParams


TRAINING = {  # preset -> (default steps, learning rate, sequence length); the walk is learnt by then
    "joyai-flash-debug": (40, 3e-3, 65),
    "joyai-flash-small": (25, 2e-3, 33),
}


def train_stand_in(preset: str, steps: int | None, seed: int = 0):
    from flashops.model import JoyAIFlash, get_config

    if preset not in TRAINING:
        raise SystemExit(f"--preset {preset}: choose one of {', '.join(TRAINING)} (or serve an export with --model)")
    default_steps, lr, length = TRAINING[preset]
    steps = steps or default_steps
    torch.manual_seed(seed)
    cfg = get_config(preset, {"vocab_size": 512, "max_seq_len": 512})
    model = JoyAIFlash(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    letters = [3 + ord(c) for c in string.ascii_lowercase]  # byte ids after 3 specials
    for _ in range(steps):
        rows = []
        for _ in range(8):
            i, row = int(torch.randint(0, 26, (), generator=g)), []
            for _ in range(length):
                row.append(letters[i % 26])
                i += 2 if float(torch.rand((), generator=g)) < 0.3 else 1
            rows.append(row)
        batch = torch.tensor(rows)
        out = model(batch[:, :-1])
        ce = torch.nn.functional.cross_entropy
        loss = ce(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        loss = loss + 0.5 * ce(out.mtp_logits[:, 1:].flatten(0, 1), batch[:, 2:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_bias()
    print(f"stand-in model: {preset}, {steps} steps, final loss {loss.item():.3f}", flush=True)
    return model.eval(), [letters[:4], letters[5:9], letters[10:12], letters[20:25]]


def load_export(uri: str):
    from flashops.serving.loading import fetch, load_codec, load_model

    directory = fetch(uri)
    model, _ = load_model(directory)
    codec = load_codec(directory)
    prompts = [codec.encode(t) for t in ("The answer is", "def main():", "Once upon a time", "1 2 3 4")]
    return model, prompts, directory


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def make_engine(model, batch: int, k: int, max_len: int) -> Engine:
    """The flashops runtime's engine and backend, on whatever device and dtype the model is (see main)."""
    return Engine(JoyAIBackend(model, slots=batch, max_len=max_len), lambda ids: "", None, k,
                  ModelMetrics(f"bench-k{k}-b{batch}"))


def expert_bytes(model) -> int:
    """The routed experts' weights (parameters or packed buffers)."""
    experts = [moe.routed_experts.inner_experts for moe in model.moe_layers]
    return sum(t.numel() * t.element_size() for e in experts for t in [*e.parameters(), *e.buffers()])


def machine() -> str:
    from flashops.model.cpu_kernels import cpu_model

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores); load average {load}"


PARTS = ("routed experts", "router", "shared experts", "attention", "dense MLP", "lm_head")


def _part_modules(model) -> dict[str, list[torch.nn.Module]]:
    parts = {p: [] for p in PARTS}
    for block in model.layers.values():
        parts["attention"].append(block.attention)
        if block.moe_enabled:
            parts["routed experts"].append(block.moe.routed_experts.inner_experts)
            parts["router"].append(block.moe.router)
            if block.moe.shared_experts is not None:
                parts["shared experts"].append(block.moe.shared_experts)
        else:
            parts["dense MLP"].append(block.feed_forward)
    parts["lm_head"].append(model.lm_head)
    return parts


def profile_decode(models: dict[str, torch.nn.Module], prompt: list[int], steps: int, rounds: int
                   ) -> dict[str, dict[str, float]]:
    """Milliseconds per batch-1 decode step by part (module forward hooks), the models interleaved step by
    step; per part the median over steps (a loaded machine preempts single steps: medians, not sums)."""
    current: dict[str, float] = dict.fromkeys(PARTS, 0.0)
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in models}
    hooks, backends = [], {}
    for label, model in models.items():
        for part, modules in _part_modules(model).items():
            for module in modules:
                def pre(m, _args):
                    m._bench_t0 = time.perf_counter()

                def post(m, _args, _out, part=part):
                    current[part] += time.perf_counter() - m._bench_t0
                hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        backends[label] = JoyAIBackend(model, slots=1, max_len=len(prompt) + steps * rounds + 1)
    try:
        for backend in backends.values():  # prefill, not timed
            backend.forward([0], torch.tensor([prompt]), [0])
        for i in range(steps * rounds):
            for label, backend in backends.items():
                current.update(dict.fromkeys(PARTS, 0.0))
                t0 = time.perf_counter()
                backend.forward([0], torch.tensor([[prompt[-1]]]), [len(prompt) + i])
                samples[label].append({**current, "total": time.perf_counter() - t0})
    finally:
        for h in hooks:
            h.remove()
    return {label: {part: 1e3 * statistics.median(x[part] for x in xs) for part in (*PARTS, "total")}
            for label, xs in samples.items()}


def device_name(device: str) -> str:
    """What ran the figures (benchmarks name their hardware)."""
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU") if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"CPU {cpu}, torch {torch.__version__}"


async def decode_once(engine: Engine, prompts: list[list[int]], batch: int, tokens: int) -> float:
    """tokens/s over the whole batch for greedy decoding of `tokens` new tokens per sequence."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)

    async def one(p):
        n = 0
        async for chunk in engine.generate(p, params):
            n += len(chunk.token_ids)
        return n

    start = time.perf_counter()
    n = sum(await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(batch))))
    return n / (time.perf_counter() - start)


def compare(configs: dict[str, tuple], prompts, tokens: int, max_len: int, rounds: int, baseline: str
            ) -> dict[str, dict]:
    """configs: label -> (model, batch, k). Interleaved rounds; per label the median tokens/s, the
    median per-round ratio to `baseline`, and the mean acceptance length over the timed rounds."""

    async def run():
        engines = {label: make_engine(m, b, k, max_len) for label, (m, b, k) in configs.items()}
        try:
            for label, engine in engines.items():  # warm-up (allocations, first-call costs)
                await decode_once(engine, prompts, configs[label][1], min(tokens, 16))
                engine.metrics.steps = engine.metrics.emitted = 0
            per_round = []
            for _ in range(rounds):
                per_round.append({label: await decode_once(e, prompts, configs[label][1], tokens)
                                  for label, e in engines.items()})
            return per_round, {label: e.metrics for label, e in engines.items()}
        finally:
            for e in engines.values():
                await e.aclose()

    per_round, metrics = asyncio.run(run())
    return {label: {
        "tokens_per_s": statistics.median(r[label] for r in per_round),
        "speedup": statistics.median(r[label] / r[baseline] for r in per_round),
        "speedup_spread": [min(r[label] / r[baseline] for r in per_round),
                           max(r[label] / r[baseline] for r in per_round)],
        "acceptance_length": metrics[label].mean_acceptance_length if configs[label][2] else 1.0,
    } for label in configs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model export URI (default: train a stand-in of --preset)")
    ap.add_argument("--preset", default="joyai-flash-debug", help=f"stand-in to train: {', '.join(TRAINING)}")
    ap.add_argument("--train-steps", type=int, help="stand-in training steps (default per preset)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, help="also write the figures here (after each table)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the runtime's weights and KV cache live")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and KV cache dtype (bfloat16 on GPUs; logits are float32 either way)")
    ap.add_argument("--only", choices=["mtp", "int4"], help="run only the MTP table or only INT4 vs fp32")
    ap.add_argument("--profile", action="store_true", help="split a batch-1 decode step by part (fp32 and INT4)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (use --device cpu)")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(machine(), flush=True)
    began = time.perf_counter()
    if args.model:
        model, prompts, _ = load_export(args.model)
        name = args.model
    else:
        model, prompts = train_stand_in(args.preset, args.train_steps)
        name = f"{args.preset} stand-in"
    from flashops.model.export import read_int4, save_int4

    int4_dir = tempfile.TemporaryDirectory()  # quantized from the fp32 CPU weights, before they move
    save_int4(Path(int4_dir.name) / "int4.safetensors", model)
    model = place(model, args.device, dtype)
    max_len = max(len(p) for p in prompts) + args.tokens + 8
    print(f"model: {name}, {args.tokens} new tokens per sequence, {args.rounds} rounds, {args.threads} thread(s)")
    print(f"runtime: the flashops engine on {args.device} in {args.dtype}: {device_name(args.device)}", flush=True)

    results = {"device": device_name(args.device), "dtype": args.dtype}
    if args.only != "int4":
        results.update(mtp_table(model, prompts, args, max_len))
        if args.json:  # the MTP table is the GPU check's main figure: keep it even if the INT4 part fails
            args.json.write_text(json.dumps(results, indent=2))
    if args.only != "mtp":
        with int4_dir as d:  # Int4Experts picks its kernel for the device (the packed one is CPU only)
            int4 = read_int4(Path(d) / "int4.safetensors", device=args.device)
        if args.dtype != "float32":  # place casts every float buffer, the packed kernel's bf16 scales too
            int4 = place(int4, args.device, dtype)
        results.update(int4_table(model, int4, prompts, args, max_len, results))
    print(f"total {time.perf_counter() - began:.0f} s; {machine()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def mtp_table(model, prompts, args, max_len) -> dict:
    results = {}
    print(f"\n{'batch':>5} {'k':>2} {'tok/s':>9} {'speedup':>8} {'(min..max)':>13} {'accept len':>10}")
    for batch in (1, 8):
        table = compare({f"b{batch}_k{k}": (model, batch, k) for k in range(4)}, prompts, args.tokens, max_len,
                        args.rounds, baseline=f"b{batch}_k0")
        results.update(table)
        for k in range(4):
            r = table[f"b{batch}_k{k}"]
            lo, hi = r["speedup_spread"]
            print(f"{batch:>5} {k:>2} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x {f'{lo:.2f}..{hi:.2f}':>13} "
                  f"{r['acceptance_length']:>10.2f}", flush=True)
    best_k = max(range(4), key=lambda k: results[f"b1_k{k}"]["speedup"])
    print(f"best k at batch 1: {best_k} ({results[f'b1_k{best_k}']['speedup']:.2f}x); acceptance length at k=3: "
          f"{results['b1_k3']['acceptance_length']:.2f} (target: >= 1.5x, >= 2.0)")
    return results


def int4_table(model, int4, prompts, args, max_len, results) -> dict:
    from flashops.model import cpu_kernels
    from flashops.model.export import Int4Experts

    results = dict(results)
    kernel = next(m.kernel for m in int4.modules() if isinstance(m, Int4Experts))
    print(f"\nINT4 experts kernel: {kernel}; {cpu_kernels.int4_kernel().describe()}")
    if args.device == "cpu" and args.dtype == "float32":  # the logit change INT4 makes, as an export measures it
        with torch.inference_mode():
            ids = torch.tensor([prompts[0]])
            full = model(ids, mtp=False).logits
            exact = read_int4_exact(model)(ids, mtp=False).logits
            served = int4(ids, mtp=False).logits
        tolerance, change = float((exact - full).abs().max()), float((served - full).abs().max())
        print(f"max |logit change| vs fp32: served INT4 {change:.5f}, exact INT4 (fake quant, the tolerance) "
              f"{tolerance:.5f} -> {'within' if change <= tolerance * 1.05 + 1e-5 else 'OUTSIDE'} tolerance (+5%)")
        results["int4_logits"] = {"served_change": change, "tolerance": tolerance}
    best_k = max(range(4), key=lambda k: results[f"b1_k{k}"]["speedup"]) if "b1_k0" in results else 0
    print(f"\n{'weights':>8} {'MiB':>8} {'k':>2} {'tok/s b1':>9} {'vs fp32':>8} {'tok/s b8':>9} {'vs fp32':>8}")
    for k in sorted({0, best_k}):
        for batch in (1, 8):
            results.update(compare({f"{w}_k{k}_b{batch}": (m, batch, k) for w, m in (("fp32", model), ("int4", int4))},
                                   prompts, args.tokens, max_len, args.rounds, baseline=f"fp32_k{k}_b{batch}"))
        for label, m in (("fp32", model), ("int4", int4)):
            mib = weight_bytes(m) / 2**20
            r1, r8 = results[f"{label}_k{k}_b1"], results[f"{label}_k{k}_b8"]
            r1["weight_mib"] = r8["weight_mib"] = mib
            print(f"{label:>8} {mib:>8.2f} {k:>2} {r1['tokens_per_s']:>9.1f} {r1['speedup']:>7.2f}x "
                  f"{r8['tokens_per_s']:>9.1f} {r8['speedup']:>7.2f}x", flush=True)
    fp, q = results["fp32_k0_b1"], results["int4_k0_b1"]
    fp_e, q_e = expert_bytes(model) / 2**20, expert_bytes(int4) / 2**20
    lo, hi = q["speedup_spread"]
    print(f"\nINT4/fp32: memory {q['weight_mib'] / fp['weight_mib']:.2f}x (routed experts {q_e:.1f} vs {fp_e:.1f} MiB, "
          f"{q_e / fp_e:.3f}x), tok/s (b1, k=0) {q['speedup']:.2f}x (rounds {lo:.2f}..{hi:.2f}; target >= 1.3x)")
    if args.profile:
        split = profile_decode({"fp32": model, "int4": int4}, prompts[0], steps=max(args.tokens, 32),
                               rounds=args.rounds)
        print(f"\nbatch-1 decode step split, median ms per step (module hooks; rest = total - parts: embedding, "
              f"norms, MoE dispatch, KV cache, Python)")
        print(f"{'part':>15} {'fp32':>8} {'int4':>8}")
        for part in (*PARTS, "rest", "total"):
            row = {label: (parts["total"] - sum(parts[p] for p in PARTS)) if part == "rest" else parts[part]
                   for label, parts in split.items()}
            share = row["fp32"] / split["fp32"]["total"]
            print(f"{part:>15} {row['fp32']:>8.3f} {row['int4']:>8.3f}   ({share:.0%} of fp32)")
        results["profile_ms"] = split
    return results


def read_int4_exact(model):
    """The same INT4 weights through the exact (dequantizing, fp32) kernel: what the export's tolerance means."""
    from flashops.model.export import load_int4, export_int4

    tensors, _ = export_int4(model)
    return load_int4(tensors, model.arch, kernel="dequant")


if __name__ == "__main__":
    main()
