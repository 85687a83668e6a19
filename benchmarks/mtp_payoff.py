"""MTP's payoff on the project's own model: speculative decoding (greedy, batch 1) on a model trained by the
quickstart pipeline on its own data, and what training the MTP layer through RL (rl.mtp.train) buys.

    .venv/bin/python benchmarks/mtp_payoff.py                          # examples/quickstart.yaml
    .venv/bin/python benchmarks/mtp_payoff.py --workdir /tmp/mtp-payoff --rounds 5 --json out.json

What it does:
1. Trains the pipeline's stages before RL (pretrain -> sft -> dpo of --pipeline, as `flashops run` would)
   into --workdir (a rerun reuses finished checkpoints; rl_gain.py's training), then per RL seed (--seeds,
   0 1 2) its RL stage twice from the same DPO checkpoint: rl.mtp.train false (the MTP layer as SFT left it)
   and true (it learns the policy's own rollouts).
2. Acceptance length at k = 1..3 on the held-out RL prompts (the ones the RL stage evaluates on), greedy,
   batch 1, through the serving engine, for the DPO model and every RL model, with the median and spread
   over seeds; the speculative output is checked token for token against plain greedy.
3. Cost split at batch 1 (the first seed's rl.mtp.train model): one main decode step (1 token), one MTP
   draft call (1 pair) and one verify pass (k+1 tokens), in ms, timed interleaved; and the speedup k=3 vs
   k=0, paired per round (median over --rounds), next to what the cost split predicts:
   accept_len / ((verify + k x mtp) / main).

Timing runs on --threads 1 (serving_decode.py says why); the machine and its load are printed first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    from flashops.model.cpu_kernels import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


# ---- training through the project's pipeline ----------------------------------------------------------


def train(pipeline_file: Path, workdir: Path, seeds: list[int]) -> dict:
    """Checkpoint URIs: the last stage before RL ("start"), and per RL seed the RL stage without and with
    rl.mtp.train ({"rl_mtp_off": {seed: uri}, "rl_mtp_on": {seed: uri}}), trained as rl_gain.py trains them."""
    from rl_gain import rl_stage_index, train_rl, train_start

    from flashops.api.spec import TrainingPipeline, load_file
    from flashops.storage import open_store

    pipeline = next(o for o in load_file(pipeline_file) if isinstance(o, TrainingPipeline))
    store = open_store(f"file://{workdir}/store")
    rl_index = rl_stage_index(pipeline)
    start = train_start(pipeline, store, rl_index)[-1][1]
    uris: dict = {"start": start}
    for label, on in (("rl_mtp_off", False), ("rl_mtp_on", True)):
        uris[label] = {seed: train_rl(pipeline, store, rl_index, start, seed, [f"rl.mtp.train={str(on).lower()}"])[0]
                       for seed in seeds}
    return uris


def load(uri: str):
    from flashops.model import JoyAIFlash
    from flashops.model.config import JoyAIConfig
    from flashops.storage import load_checkpoint, open_store, split_checkpoint_uri

    root, _, _ = split_checkpoint_uri(uri)
    model = JoyAIFlash(JoyAIConfig.from_dict(open_store(root).meta(uri).model_config))
    load_checkpoint(uri, {"model": model.state_dict()})
    return model.eval()


def rl_prompts(pipeline_file: Path) -> list[list[int]]:
    """The held-out RL prompts the RL stage evaluates on, as the chat prompts it sends."""
    from flashops.api.spec import TrainingPipeline, load_file
    from flashops.model.tokenizer import TokenizerCodec
    from flashops.trainers.corpora import eval_tasks
    from flashops.trainers.rl import task_prompts
    from flashops.trainers.tasks import DOMAINS

    pipeline = next(o for o in load_file(pipeline_file) if isinstance(o, TrainingPipeline))
    rl = next(s.spec for s in pipeline.spec.stages if s.spec.stage == "rl")
    codec = TokenizerCodec(skip_special_tokens=False)
    tasks = eval_tasks(4, rl.training.seed, tuple(rl.rl.domains or DOMAINS))
    return task_prompts(codec, tasks), codec.eos


# ---- decoding ----------------------------------------------------------------------------------------


def engine(model, k: int, max_len: int, eos: int):
    from flashops.serving.backend import JoyAIBackend
    from flashops.serving.engine import Engine
    from flashops.serving.metrics import ModelMetrics

    return Engine(JoyAIBackend(model, slots=1, max_len=max_len), lambda ids: "", eos, k, ModelMetrics(f"payoff-k{k}"))


async def _decode(eng, prompts, tokens: int) -> tuple[list[list[int]], int, float, float]:
    """Greedy, one request at a time (batch 1): (outputs, tokens emitted, wall seconds, CPU seconds)."""
    from flashops.serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    outs, n = [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for p in prompts:
        out = []
        async for chunk in eng.generate(p, params):
            out += chunk.token_ids
        outs.append(out)
        n += len(out)
    return outs, n, time.perf_counter() - start, time.process_time() - cpu


def acceptance(model, prompts, tokens: int, max_len: int, eos: int) -> dict:
    """Acceptance length per k on every prompt, and whether speculative greedy equals plain greedy."""

    async def run():
        engines = {k: engine(model, k, max_len, eos) for k in range(4)}
        try:
            outs = {k: (await _decode(e, prompts, tokens))[0] for k, e in engines.items()}
            return outs, {k: e.metrics for k, e in engines.items()}
        finally:
            for e in engines.values():
                await e.aclose()

    outs, metrics = asyncio.run(run())
    return {"acceptance_length": {k: metrics[k].mean_acceptance_length for k in (1, 2, 3)},
            "by_position_k3": metrics[3].acceptance_by_position(),
            "equals_plain_greedy": all(outs[k] == outs[0] for k in (1, 2, 3)),
            "mean_new_tokens": sum(len(o) for o in outs[0]) / len(prompts)}


def speedup(model, prompts, tokens: int, max_len: int, eos: int, rounds: int) -> dict:
    """k = 1..3 vs plain decoding, batch 1, interleaved rounds: the median per-round ratio of tokens per
    wall second and of tokens per CPU second of this process (on a loaded machine the wall clock mostly
    measures the scheduler; the CPU time is what the decoding cost)."""

    async def run():
        engines = {j: engine(model, j, max_len, eos) for j in range(4)}
        try:
            for e in engines.values():
                await _decode(e, prompts[:2], tokens)  # warm-up
            per_round = []
            for _ in range(rounds):
                r = {}
                for j, e in engines.items():
                    _, n, wall, cpu = await _decode(e, prompts, tokens)
                    r[j] = (n / wall, n / max(cpu, 1e-9))
                per_round.append(r)
            return per_round
        finally:
            for e in engines.values():
                await e.aclose()

    per_round = asyncio.run(run())
    out = {}
    for j in (1, 2, 3):
        wall = [r[j][0] / r[0][0] for r in per_round]
        cpu = [r[j][1] / r[0][1] for r in per_round]
        out[f"k{j}"] = {"speedup_wall": statistics.median(wall), "wall_spread": [min(wall), max(wall)],
                        "speedup_cpu": statistics.median(cpu), "cpu_spread": [min(cpu), max(cpu)]}
    out["tokens_per_s_k0"] = statistics.median(r[0][0] for r in per_round)
    out["tokens_per_cpu_s_k0"] = statistics.median(r[0][1] for r in per_round)
    return out


@torch.inference_mode()
def cost_split(model, context: int, k: int = 3, reps: int = 60) -> dict:
    """ms per call at batch 1 with `context` tokens cached: main decode step (1 token + its logits), one MTP
    draft call (1 pair + its logits) and the verify pass (k+1 tokens + their logits), interleaved."""
    from flashops.serving.backend import JoyAIBackend

    backend = JoyAIBackend(model, slots=1, max_len=context + k + 2)
    prompt = torch.randint(3, model.arch.vocab_size, (1, context))
    _, hidden = backend.forward([0], prompt, [0])
    backend.mtp([0], hidden[:, :-1], prompt[:, 1:], [0])
    one, verify = prompt[:, -1:], prompt[:, -(k + 1):]
    h1 = hidden[:, -1:]
    calls = {
        "main_ms": lambda: backend.forward([0], one, [context]),
        "mtp_ms": lambda: backend.mtp([0], h1, one, [context]),
        "verify_ms": lambda: backend.forward([0], verify, [context]),
    }
    times: dict[str, list[float]] = {f"{name}_{clock}": [] for name in calls for clock in ("wall", "cpu")}
    for _ in range(5):
        for f in calls.values():
            f()
    for _ in range(reps):
        for name, f in calls.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            times[f"{name}_cpu"].append((time.process_time() - c) * 1e3)
            times[f"{name}_wall"].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=ROOT / "examples" / "quickstart.yaml",
                    help="a TrainingPipeline with an rl stage (default: the quickstart)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flashops-mtp-payoff"),
                    help="checkpoints go here; a rerun reuses finished runs")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per prompt (the answer ends at <eos>)")
    ap.add_argument("--prompts", type=int, default=24, help="RL prompts decoded (of the 48 held out)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="RL seeds (training.seed of the RL stage); each trains RL with and without rl.mtp.train")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"training {args.pipeline} into {args.workdir}", flush=True)
    uris = train(args.pipeline, args.workdir, args.seeds)
    prompts, eos = rl_prompts(args.pipeline)
    prompts = prompts[: args.prompts]
    max_len = max(len(p) for p in prompts) + args.tokens + 8
    results: dict = {"machine": machine(), "pipeline": str(args.pipeline), "checkpoints": uris, "seeds": args.seeds}

    print(f"\nacceptance length, greedy, batch 1, {len(prompts)} held-out RL prompts, <= {args.tokens} new tokens")
    print(f"{'model':>18} {'k=1':>6} {'k=2':>6} {'k=3':>6} {'k=3 by position':>22} {'= greedy':>9}")
    runs = [("start", None, uris["start"])] + [(label, seed, uris[label][seed]) for label in ("rl_mtp_off", "rl_mtp_on")
                                               for seed in args.seeds]
    for label, seed, uri in runs:
        r = acceptance(load(uri), prompts, args.tokens, max_len, eos)
        if seed is None:
            results[label] = r
        else:
            results.setdefault(label, {})[seed] = r
        acc = r["acceptance_length"]
        pos = " ".join(f"{v:.2f}" for v in r["by_position_k3"].values())
        name = label if seed is None else f"{label} seed {seed}"
        print(f"{name:>18} {acc[1]:>6.2f} {acc[2]:>6.2f} {acc[3]:>6.2f} {pos:>22} {str(r['equals_plain_greedy']):>9}",
              flush=True)
    for label in ("rl_mtp_off", "rl_mtp_on"):  # medians over the RL seeds, [min..max]
        per_k = {k: [results[label][seed]["acceptance_length"][k] for seed in args.seeds] for k in (1, 2, 3)}
        results[label]["acceptance_length"] = {k: statistics.median(v) for k, v in per_k.items()}
        results[label]["acceptance_spread"] = {k: [min(v), max(v)] for k, v in per_k.items()}

    final = load(uris["rl_mtp_on"][args.seeds[0]])
    context = max(len(p) for p in prompts) + args.tokens // 2
    split = cost_split(final, context)
    timing = speedup(final, prompts, args.tokens, max_len, eos, args.rounds)
    results["cost_split_b1"], results["speedup_b1"] = split, timing
    print(f"\ncost split, batch 1, {context} tokens cached (rl_mtp_on model, {args.threads} thread(s)), CPU ms "
          f"(wall ms):")
    main_ms = split["main_ms_cpu"]
    print(f"  main decode step {main_ms:.2f} ({split['main_ms_wall']:.2f}) | MTP draft call "
          f"{split['mtp_ms_cpu']:.2f} ({split['mtp_ms_wall']:.2f}) = {split['mtp_ms_cpu'] / main_ms:.2f}x main | "
          f"verify of 4 tokens {split['verify_ms_cpu']:.2f} ({split['verify_ms_wall']:.2f}) = "
          f"{split['verify_ms_cpu'] / main_ms:.2f}x main")
    step = (split["verify_ms_cpu"] + 3 * split["mtp_ms_cpu"]) / main_ms
    print(f"  one k=3 step costs {step:.2f} main steps: a 1.9x speedup would need an acceptance length of "
          f"{1.9 * step:.2f} (at most 4)")
    print(f"\n{'k':>2} {'accept len':>10} {'speedup (CPU time)':>24} {'speedup (wall)':>22}")
    for j in (1, 2, 3):
        t = timing[f"k{j}"]
        acc = results["rl_mtp_on"][args.seeds[0]]["acceptance_length"][j]
        print(f"{j:>2} {acc:>10.2f} {t['speedup_cpu']:>7.2f}x ({t['cpu_spread'][0]:.2f}..{t['cpu_spread'][1]:.2f})"
              f" {t['speedup_wall']:>9.2f}x ({t['wall_spread'][0]:.2f}..{t['wall_spread'][1]:.2f})")
    acc3, sp3 = results["rl_mtp_on"][args.seeds[0]]["acceptance_length"][3], timing["k3"]["speedup_cpu"]
    results["predicted_k3_speedup_from_split"] = acc3 / step
    print(f"k=3 speedup predicted from the cost split: {acc3 / step:.2f}x; plain decoding "
          f"{timing['tokens_per_cpu_s_k0']:.1f} tokens per CPU second, {timing['tokens_per_s_k0']:.1f} per wall second")
    before = results["start"]["acceptance_length"]
    print(f"\nMTP through RL, acceptance length at k = 1 / 2 / 3, median [min..max] over RL seeds {args.seeds}; "
          f"before RL {' / '.join(f'{before[k]:.2f}' for k in (1, 2, 3))}")
    for label, what in (("rl_mtp_off", "rl.mtp.train false"), ("rl_mtp_on", "rl.mtp.train true")):
        acc, spread = results[label]["acceptance_length"], results[label]["acceptance_spread"]
        print(f"  {what:>18}: " + " / ".join(f"{acc[k]:.2f} [{spread[k][0]:.2f}..{spread[k][1]:.2f}]" for k in (1, 2, 3)))
    print(f"targets (issue 14, batch 1): acceptance >= 2.2 at k=3: {'met' if acc3 >= 2.2 else 'NOT met'}; speedup "
          f">= 1.9x: {'met' if sp3 >= 1.9 else 'NOT met'} ({sp3:.2f}x CPU time); total "
          f"{time.perf_counter() - began:.0f} s; machine at the end: {machine()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
