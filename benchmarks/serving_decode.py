"""Decode speed of the serving engine: MTP speculative decoding k = 0..3 at batch 1 and 8, and INT4
routed experts against full precision (weight memory and tokens/s). Prints a table; ratios are
against k = 0 (and full precision) measured in the same run.

    .venv/bin/python benchmarks/serving_decode.py                       # trains a stand-in debug model first
    .venv/bin/python benchmarks/serving_decode.py --model file:///.../models/chat/v1 --tokens 128

Without --model the script trains a joyai-flash-debug model (MTP on, QAT-free) for a few dozen steps on a
"letter walk" language (next letter with p=0.7, the one after with p=0.3): a stand-in until the quickstart
pipeline's exported model is available. Its MTP layer learns the walk well, so acceptance is optimistic.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import string
import tempfile
import time
from pathlib import Path

import torch

from flashops.serving.backend import JoyAIBackend
from flashops.serving.engine import Engine
from flashops.serving.metrics import ModelMetrics
from flashops.serving.sampling import SamplingParams


def train_stand_in(steps: int, seed: int = 0):
    from flashops.model import JoyAIFlash, get_config

    torch.manual_seed(seed)
    cfg = get_config("joyai-flash-debug", {"vocab_size": 512, "max_seq_len": 512})
    model = JoyAIFlash(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    letters = [3 + ord(c) for c in string.ascii_lowercase]  # byte ids after 3 specials
    for _ in range(steps):
        rows = []
        for _ in range(8):
            i, row = int(torch.randint(0, 26, (), generator=g)), []
            for _ in range(65):
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
    print(f"stand-in model: joyai-flash-debug, {steps} steps, final loss {loss.item():.3f}")
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


def decode(model, prompts: list[list[int]], batch: int, k: int, tokens: int, max_len: int) -> tuple[float, float]:
    """(tokens/s over the whole batch, mean acceptance length) for greedy decoding of `tokens` per sequence."""
    engine = Engine(JoyAIBackend(model, slots=batch, max_len=max_len), lambda ids: "", None, k,
                    ModelMetrics(f"bench-k{k}-b{batch}"))
    params = SamplingParams(max_tokens=tokens, temperature=0.0)

    async def one(p):
        n = 0
        async for chunk in engine.generate(p, params):
            n += len(chunk.token_ids)
        return n

    async def run():
        await asyncio.gather(*(one(prompts[0]) for _ in range(batch)))  # warm-up (also allocates)
        start = time.perf_counter()
        n = sum(await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(batch))))
        elapsed = time.perf_counter() - start
        await engine.aclose()
        return n / elapsed

    engine.metrics.steps = engine.metrics.emitted = 0
    tps = asyncio.run(run())
    return tps, engine.metrics.mean_acceptance_length if k else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model export URI (default: train a stand-in)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model:
        model, prompts, _ = load_export(args.model)
    else:
        model, prompts = train_stand_in(args.train_steps)
    max_len = max(len(p) for p in prompts) + args.tokens + 8

    rows, results = [], {}
    print(f"\n{'batch':>5} {'k':>2} {'tok/s':>9} {'speedup':>8} {'accept len':>10}")
    for batch in (1, 8):
        base = None
        for k in range(4):
            tps, acc = decode(model, prompts, batch, k, args.tokens, max_len)
            base = base or tps
            results[f"b{batch}_k{k}"] = {"tokens_per_s": tps, "speedup": tps / base, "acceptance_length": acc}
            print(f"{batch:>5} {k:>2} {tps:>9.1f} {tps / base:>7.2f}x {acc:>10.2f}")

    from flashops.model.export import read_int4, save_int4

    with tempfile.TemporaryDirectory() as d:
        save_int4(Path(d) / "int4.safetensors", model)
        int4 = read_int4(Path(d) / "int4.safetensors")
    best_k = max(range(4), key=lambda k: results[f"b1_k{k}"]["tokens_per_s"])
    print(f"\n{'weights':>8} {'MiB':>8} {'k':>2} {'tok/s b1':>9} {'tok/s b8':>9}")
    for label, m in (("fp32", model), ("int4", int4)):
        mib = weight_bytes(m) / 2**20
        for k in sorted({0, best_k}):
            t1, _ = decode(m, prompts, 1, k, args.tokens, max_len)
            t8, _ = decode(m, prompts, 8, k, args.tokens, max_len)
            results[f"{label}_k{k}"] = {"weight_mib": mib, "tokens_per_s_b1": t1, "tokens_per_s_b8": t8}
            print(f"{label:>8} {mib:>8.2f} {k:>2} {t1:>9.1f} {t8:>9.1f}")
    fp, q = results["fp32_k0"], results["int4_k0"]
    print(f"\nINT4/fp32: memory {q['weight_mib'] / fp['weight_mib']:.2f}x, tok/s (b1, k=0) "
          f"{q['tokens_per_s_b1'] / fp['tokens_per_s_b1']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
