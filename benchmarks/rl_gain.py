"""Does the quickstart's RL stage help? Held-out greedy accuracy before RL and after it, over several seeds.

    .venv/bin/python benchmarks/rl_gain.py                                   # examples/quickstart.yaml, 3 seeds
    .venv/bin/python benchmarks/rl_gain.py --workdir /tmp/rl-gain --seeds 0 1 2 --json out.json
    .venv/bin/python benchmarks/rl_gain.py --workdir /tmp/rl-gain --partial-credit 0   # same DPO, binary reward
    .venv/bin/python benchmarks/rl_gain.py --workdir /tmp/rl-gain --set rl.temperature=0.7 --set optimizer.lr=3e-5

What it does:
1. Trains the pipeline's stages before RL (pretrain -> sft -> dpo of --pipeline, as `flashops run` would; eval
   stages skipped) into --workdir once; a rerun reuses finished checkpoints.
2. Runs the pipeline's RL stage from that DPO checkpoint once per seed (training.seed = seed: rollout sampling,
   the curriculum's draws and profile subset), each into its own run; finished runs are reused.
3. Evaluates the DPO checkpoint and each RL checkpoint on builtin:rl-heldout (prompts no training stage ever
   samples) with the code `flashops eval` runs (flashops.cli.eval_commands.run_evaluation: greedy, through the
   serving engine), at the pipeline's eval-stage maxTokens. Both modes are printed (the quickstart's RL stage
   trains both: rl.thinkingRatio 0.5). It also prints the RL stage's own before/after
   greedy accuracy on its own held-out prompts (trainers/rl.py: 47), a second, larger held-out sample.
4. Evaluates the same checkpoints on a wider held-out suite, --wide-per-level prompts per domain and level from
   the same held-out split (8: 91 tasks, a superset of builtin:rl-heldout's 24), written to
   <workdir>/rl-heldout-<n>.jsonl: one task is 0.011 there against 0.042, so a gain of a few tasks shows.
5. Samples --headroom-samples answers per wider-suite task from the start and prints, per domain, greedy accuracy
   against pass@k: RL turns sampled hits into greedy ones, so where greedy already matches pass@k (or pass@k on
   small-number answers is guessing) there is little for it to gain.
6. When a stage (DPO) sits between SFT and RL, also evaluates the SFT checkpoint on the wider suite and prints
   where each RL checkpoint ends against it: a gain over a start that DPO lowered can be a repair, not a step
   past what SFT taught.

It prints per seed before / after / gain and the median and [min..max] of the gain, the CPU and the load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = "builtin:rl-heldout"


def machine() -> str:
    from flashops.model.cpu_kernels import cpu_model

    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{cpu_model()}, {os.cpu_count()} cores; uptime: {up}"


def _finished(store, run):
    ref = store.latest(run.metadata.name)
    return ref if ref is not None and ref.step == run.spec.training.steps else None


def rl_stage_index(pipeline) -> int:
    index = next((i for i, s in enumerate(pipeline.spec.stages) if s.spec.stage == "rl"), None)
    if index is None:
        raise SystemExit("the pipeline has no rl stage")
    return index


def train_start(pipeline, store, rl_index: int) -> list[tuple[str, str]]:
    """(stage kind, checkpoint) of each training stage before the RL stage at rl_index (trained or reused), in
    pipeline order: the last one is where RL starts."""
    from flashops.api.spec import pipeline_stage_run
    from flashops.trainers.runner import run_training

    stages = pipeline.spec.stages
    previous = None
    trained: list[tuple[str, str]] = []
    for i in range(rl_index):
        if stages[i].spec.stage == "eval":
            continue
        run = pipeline_stage_run(pipeline, i, previous)
        if (ref := _finished(store, run)) is not None:
            previous = ref.uri
            trained.append((stages[i].spec.stage, previous))
            print(f"  {run.metadata.name}: reusing {ref.uri}", flush=True)
            continue
        began = time.perf_counter()
        result = run_training(run, store, False)
        previous = result.checkpoint_uri
        trained.append((stages[i].spec.stage, previous))
        print(f"  {run.metadata.name}: {result.steps} steps, loss {result.metrics.get('loss', float('nan')):.3f} "
              f"({time.perf_counter() - began:.0f} s)", flush=True)
    return trained


def with_settings(spec, settings: list[str]):
    """The stage spec with `settings` ("rl.temperature=0.7", camelCase paths as in YAML, YAML values) applied
    and validated again, as a spec file with those values would be."""
    import yaml

    body = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    for setting in settings:
        path, eq, value = setting.partition("=")
        if not eq or not path:
            raise ValueError(f"--set {setting!r}: expected PATH=VALUE, e.g. rl.temperature=0.7")
        node, *keys = body, *path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(value)
    return type(spec).model_validate(body)


def train_rl(pipeline, store, rl_index: int, start: str, seed: int, settings: list[str]) -> tuple[str, dict]:
    """The pipeline's RL stage from `start` with training.seed = seed and `settings` applied (with_settings):
    (checkpoint URI, its before/after table)."""
    import hashlib

    from flashops.api.spec import TrainingRun, pipeline_stage_run
    from flashops.trainers.runner import run_training

    run = pipeline_stage_run(pipeline, rl_index, start)
    spec = with_settings(run.spec, [*settings, f"training.seed={seed}"])
    name = f"{run.metadata.name}-seed{seed}"
    if settings:  # its own run per setting, so a finished one is reused only for the same settings
        name += "-" + hashlib.sha1("\n".join(settings).encode()).hexdigest()[:8]
    run = TrainingRun(metadata=run.metadata.model_copy(update={"name": name}), spec=spec)
    if (ref := _finished(store, run)) is not None:
        print(f"  {run.metadata.name}: reusing {ref.uri}", flush=True)
        return ref.uri, {}
    began = time.perf_counter()
    result = run_training(run, store, False)
    print(f"  {run.metadata.name}: {result.steps} steps, reward {result.metrics.get('reward', float('nan')):.3f} "
          f"({time.perf_counter() - began:.0f} s)", flush=True)
    table = {k: result.metrics[k] for k in ("eval_before", "eval_after") if k in result.metrics}
    return result.checkpoint_uri, table


def wide_suite(workdir: Path, per_level: int) -> str:
    """The wider held-out suite (builtin:rl-heldout's rows at per_level prompts per domain and level) as a file."""
    from flashops.trainers.tasks import heldout_suite_rows

    path = workdir / f"rl-heldout-{per_level}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in heldout_suite_rows(per_level)))
    return f"file://{path}"


def heldout(uri: str, max_tokens: int, wide: str | None = None) -> tuple[dict, dict | None]:
    """builtin:rl-heldout (and the wider suite, if given) on a checkpoint through flashops eval's code, with the
    model loaded once: accuracy per mode, per suite."""
    from flashops.cli.eval_commands import run_evaluation

    r = run_evaluation(uri, [SUITE, *([wide] if wide else [])], max_tokens=max_tokens, record=False, progress=False,
                       model_target={"ref": uri, "model_uri": None, "checkpoint_uri": uri})
    per_suite = [{m["mode"]: {"accuracy": m["accuracy"], "tasks": m["tasks"], "per_domain": m["per_domain"]}
                  for m in suite["modes"]} for suite in r["suites"]]
    return per_suite[0], (per_suite[1] if wide else None)


def headroom(uri: str, per_level: int, samples: int, max_new: int, temperature: float = 1.0) -> dict:
    """What RL could sharpen at the start: per domain, greedy accuracy, pass@samples and mean accuracy of
    `samples` sampled answers (temperature 1, non-thinking) on the wider held-out suite's tasks, and how many
    tasks some sample solves that greedy misses. RL turns sampled hits into greedy ones; where greedy already
    matches pass@k there is little to turn, and a high pass@k on small-number answers can be guessing."""
    from flashops.model.tokenizer import TokenizerCodec
    from flashops.serving.loading import load_checkpoint_model
    from flashops.trainers.rl import generate, task_prompts
    from flashops.trainers.tasks import correct, heldout_tasks

    model, _ = load_checkpoint_model(uri)
    codec = TokenizerCodec(skip_special_tokens=False)
    tasks = heldout_tasks(per_level)
    prompts = task_prompts(codec, tasks)
    greedy = generate(model, prompts, 1, max_new, 0.0, None, codec.eos, codec.pad)
    sampled = generate(model, prompts, samples, max_new, temperature, torch.Generator().manual_seed(0), codec.eos,
                       codec.pad)
    out: dict = {}
    for i, t in enumerate(tasks):
        hits = [correct(t, codec.decode(c)) for c in sampled[i * samples:(i + 1) * samples]]
        g = correct(t, codec.decode(greedy[i]))
        d = out.setdefault(t.domain, {"tasks": 0, "greedy": 0, f"pass@{samples}": 0, "mean": 0.0, "headroom": 0})
        d["tasks"] += 1
        d["greedy"] += g
        d[f"pass@{samples}"] += any(hits)
        d["mean"] += sum(hits) / samples
        d["headroom"] += any(hits) and not g
    return out


def _spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):+.3f} [{min(xs):+.3f}..{max(xs):+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=ROOT / "examples" / "quickstart.yaml",
                    help="a TrainingPipeline with an rl stage (default: the quickstart)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flashops-rl-gain"),
                    help="checkpoints go here; a rerun reuses finished runs (delete it after changing the pipeline)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL training.seed values")
    ap.add_argument("--partial-credit", type=float, default=None,
                    help="override the RL stage's rl.partialCredit (0: the binary reward), e.g. to compare with the "
                         "pipeline's setting from the same DPO checkpoint in the same --workdir")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="PATH=VALUE",
                    help="override a field of the RL stage's spec (camelCase path as in YAML), e.g. rl.temperature=0.7, "
                         "optimizer.lr=3e-5, rl.klCoef=0.05; repeatable")
    ap.add_argument("--wide-per-level", type=int, default=8, metavar="N",
                    help="also evaluate a wider held-out suite of N prompts per domain and level (8: 91 tasks; "
                         "0: skip it)")
    ap.add_argument("--headroom-samples", type=int, default=16, metavar="K",
                    help="sample K answers per wider-suite task from the start: greedy vs pass@K per domain, what RL "
                         "could turn into greedy answers (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flashops.api.spec import TrainingPipeline, load_file
    from flashops.storage import open_store

    began = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    pipeline = next(o for o in load_file(args.pipeline) if isinstance(o, TrainingPipeline))
    evals = [s.spec for s in pipeline.spec.stages if s.spec.stage == "eval"]
    max_tokens = evals[-1].eval.max_tokens if evals else 24
    rl_index = rl_stage_index(pipeline)
    settings = args.settings + ([f"rl.partialCredit={args.partial_credit}"] if args.partial_credit is not None else [])
    try:  # before any compute: a bad setting is a usage error naming the field and value
        rl_spec = with_settings(pipeline.spec.stages[rl_index].spec, settings)
    except ValueError as e:  # pydantic's ValidationError is a ValueError; it names the field and the value
        ap.error(f"{e}\n(the RL stage's fields and their descriptions: `flashops crds`, TrainingRun "
                 "spec.rl, spec.optimizer, spec.training)")
    store = open_store(f"file://{args.workdir}/store")
    print(f"training {args.pipeline} before RL into {args.workdir}", flush=True)
    trained = train_start(pipeline, store, rl_index)
    start = trained[-1][1]
    wide = wide_suite(args.workdir, args.wide_per_level) if args.wide_per_level > 0 else None
    before, wide_before = heldout(start, max_tokens, wide)
    # where SFT left the model, when a later stage (DPO) comes between it and RL: does RL end above it?
    sft_uri = next((uri for kind, uri in reversed(trained) if kind == "sft"), None)
    sft_uri = sft_uri if sft_uri != start else None
    sft, wide_sft = heldout(sft_uri, max_tokens, wide) if sft_uri else (None, None)
    room = headroom(start, args.wide_per_level, args.headroom_samples, rl_spec.rl.max_new_tokens) \
        if args.headroom_samples and wide else None
    results: dict = {"machine": machine(), "pipeline": str(args.pipeline), "suite": SUITE, "max_tokens": max_tokens,
                     "settings": settings,
                     "rl": {"optimizer": rl_spec.optimizer.model_dump(mode="json", by_alias=True),
                            "training": rl_spec.training.model_dump(mode="json", by_alias=True),
                            "rl": rl_spec.rl.model_dump(mode="json", by_alias=True)},
                     "start": start, "before": before, "wide_suite": wide, "wide_before": wide_before,
                     "sft": sft_uri, "sft_heldout": sft, "wide_sft": wide_sft, "headroom": room, "seeds": {}}
    for seed in args.seeds:
        uri, table = train_rl(pipeline, store, rl_index, start, seed, settings)
        after, wide_after = heldout(uri, max_tokens, wide)
        results["seeds"][seed] = {"checkpoint": uri, "after": after, "rl_stage_table": table, "wide_after": wide_after}

    mode = "non-thinking"
    print(f"\n{SUITE} greedy accuracy ({before[mode]['tasks']} tasks per mode, maxTokens {max_tokens}), "
          f"before RL = the DPO checkpoint")
    print(f"{'seed':>5} {'before':>7} {'after':>7} {'gain':>7}   {'thinking: before':>16} {'after':>6} {'gain':>7}"
          f"   {'rl-stage held-out: before':>27} {'after':>6} {'gain':>7}")
    gains, gains_t, gains_s = [], [], []
    for seed, r in results["seeds"].items():
        b, a = before[mode]["accuracy"], r["after"][mode]["accuracy"]
        bt, at = before["thinking"]["accuracy"], r["after"]["thinking"]["accuracy"]
        gains.append(a - b)
        gains_t.append(at - bt)
        row = f"{seed:>5} {b:>7.3f} {a:>7.3f} {a - b:>+7.3f}   {bt:>16.3f} {at:>6.3f} {at - bt:>+7.3f}"
        t = r["rl_stage_table"]
        if t:
            sb, sa = t["eval_before"]["greedy_accuracy"], t["eval_after"]["greedy_accuracy"]
            gains_s.append(sa - sb)
            row += f"   {sb:>27.3f} {sa:>6.3f} {sa - sb:>+7.3f}"
        print(row)
    results["gain"] = {"non_thinking": {"median": statistics.median(gains), "min": min(gains), "max": max(gains),
                                        "per_seed": gains},
                       "thinking": {"median": statistics.median(gains_t), "min": min(gains_t), "max": max(gains_t),
                                    "per_seed": gains_t}}
    if gains_s:
        results["gain"]["rl_stage_heldout"] = {"median": statistics.median(gains_s), "min": min(gains_s),
                                                "max": max(gains_s), "per_seed": gains_s}
    up = sum(g > 0 for g in gains)
    print(f"gain, non-thinking: {_spread(gains)}; raised in {up} of {len(gains)} seeds")
    print(f"gain, thinking:     {_spread(gains_t)}")
    if gains_s:
        prompts = next(r["rl_stage_table"]["eval_before"]["prompts"] for r in results["seeds"].values()
                       if r["rl_stage_table"])
        print(f"gain, rl stage's own {prompts} held-out prompts: {_spread(gains_s)}")
    if wide:
        results["gain"]["wide"] = {}
        for m in ("non-thinking", "thinking"):
            b = wide_before[m]["accuracy"]
            g = [r["wide_after"][m]["accuracy"] - b for r in results["seeds"].values()]
            results["gain"]["wide"][m.replace("-", "_")] = {"median": statistics.median(g), "min": min(g),
                                                           "max": max(g), "per_seed": g, "before": b}
            print(f"gain on the wider held-out suite ({wide_before[m]['tasks']} tasks), {m}: before {b:.3f}, "
                  f"{_spread(g)}; raised in {sum(x > 0 for x in g)} of {len(g)} seeds")
            per_domain = {d: [round(r["wide_after"][m]["per_domain"][d], 2) for r in results["seeds"].values()]
                          for d in wide_before[m]["per_domain"]}
            print("    per domain, before -> after per seed: " + "; ".join(
                f"{d} {wide_before[m]['per_domain'][d]:.2f} -> {v}" for d, v in per_domain.items()))
            if wide_sft:
                sft_acc = wide_sft[m]["accuracy"]
                over = [b + x - sft_acc for x in g]
                results["gain"]["wide"][m.replace("-", "_")]["over_sft"] = {
                    "sft": sft_acc, "median": statistics.median(over), "min": min(over), "max": max(over), "per_seed": over}
                print(f"    after RL against the SFT checkpoint ({sft_acc:.3f}): {_spread(over)}; above it in "
                      f"{sum(x > 0 for x in over)} of {len(over)} seeds")
    if room:
        k = args.headroom_samples
        print(f"what RL could sharpen at the start (wider suite, non-thinking, {k} samples at temperature 1): "
              "domain: greedy / pass@k / mean of the samples, tasks some sample solves that greedy misses")
        for d, r in room.items():
            n = r["tasks"]
            print(f"    {d:>10}: {r['greedy'] / n:.2f} / {r[f'pass@{k}'] / n:.2f} / {r['mean'] / n:.2f}, "
                  f"{r['headroom']} of {n}")
    print(f"total {time.perf_counter() - began:.0f} s; machine at the end: {machine()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
