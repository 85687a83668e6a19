"""Decode speed of the serving engine: MTP speculative decoding k = 0..3 at batch 1 and 8, and INT4
routed experts against full precision (weight memory and tokens/s). Prints a table; ratios are
against k = 0 (and full precision) measured in the same run.

    .venv/bin/python benchmarks/serving_decode.py                              # debug stand-in (~1 min)
    .venv/bin/python benchmarks/serving_decode.py --preset joyai-flash-small   # small stand-in (~5-10 min)
    .venv/bin/python benchmarks/serving_decode.py --model file:///.../models/chat/v1 --tokens 128

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
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import string
import tempfile
import time
from pathlib import Path

import torch

from flashops.serving.backend import JoyAIBackend
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
    return Engine(JoyAIBackend(model, slots=batch, max_len=max_len), lambda ids: "", None, k,
                  ModelMetrics(f"bench-k{k}-b{batch}"))


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
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    if args.model:
        model, prompts, _ = load_export(args.model)
        name = args.model
    else:
        model, prompts = train_stand_in(args.preset, args.train_steps)
        name = f"{args.preset} stand-in"
    max_len = max(len(p) for p in prompts) + args.tokens + 8
    print(f"model: {name}, {args.tokens} new tokens per sequence, {args.rounds} rounds, {args.threads} thread(s)")

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

    from flashops.model.export import read_int4, save_int4

    with tempfile.TemporaryDirectory() as d:
        save_int4(Path(d) / "int4.safetensors", model)
        int4 = read_int4(Path(d) / "int4.safetensors")
    best_k = max(range(4), key=lambda k: results[f"b1_k{k}"]["speedup"])
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
    print(f"\nINT4/fp32: memory {q['weight_mib'] / fp['weight_mib']:.2f}x, tok/s (b1, k=0) {q['speedup']:.2f}x")
    print(f"best k at batch 1: {best_k} ({results[f'b1_k{best_k}']['speedup']:.2f}x); acceptance length at k=3: "
          f"{results['b1_k3']['acceptance_length']:.2f} (target: >= 1.5x, >= 2.0); "
          f"total {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
