"""Batch-1 decode step time against context length: MLA attending in the latent space (the engine's path
for decode steps, MTP drafts and verifies; model.MLAttention.absorbed_attention) against expanding the
latent cache through wkv_b every step (the path it replaced; the training path). Same model, same cache,
interleaved rounds; the ratio is expanded / absorbed in the same run.

    .venv/bin/python benchmarks/mla_decode.py                                   # joyai-flash-small, 64..2048
    .venv/bin/python benchmarks/mla_decode.py --preset joyai-flash-debug --contexts 64 1024

Expanding costs S x r x H x (nope + v) multiply-adds per layer and step, so it grows with the context S
at the width of the expanded heads; the latent path grows at the width of one latent key (r + rope) per head.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from flashops.model import JoyAIFlash, get_config
from flashops.model.cpu_kernels import cpu_model
from flashops.model.model import MLAttention
from flashops.serving.backend import JoyAIBackend


def step_ms(model, context: int, steps: int) -> float:
    backend = JoyAIBackend(model, slots=1, max_len=context + steps + 1)
    prompt = torch.arange(1, context + 1).remainder(model.arch.vocab_size - 1).add(1).unsqueeze(0)
    with torch.inference_mode():
        backend.forward([0], prompt, [0])
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            backend.forward([0], torch.tensor([[5]]), [context + i])
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="joyai-flash-small")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement (median)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best per path)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores, {args.threads} thread(s)); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.preset}, batch 1, fp32")
    model = JoyAIFlash(get_config(args.preset)).eval()
    latent = MLAttention.absorb_pays
    print(f"{'context':>8} {'expanded ms':>12} {'latent ms':>10} {'speedup':>8}")
    try:
        for context in args.contexts:
            best = {"expanded": float("inf"), "latent": float("inf")}
            for _ in range(args.rounds):
                for path in best:
                    MLAttention.absorb_pays = latent if path == "latent" else (lambda self, q_len: False)
                    best[path] = min(best[path], step_ms(model, context, args.steps))
            print(f"{context:>8} {best['expanded']:>12.1f} {best['latent']:>10.1f} "
                  f"{best['expanded'] / best['latent']:>7.2f}x")
    finally:
        MLAttention.absorb_pays = latent


if __name__ == "__main__":
    main()
