"""RL stability at toy scale: does FiberPO constrain policy drift where GRPO and GSPO do not?

    .venv/bin/python benchmarks/rl_stability.py                          # 3 seeds, short and long answers
    .venv/bin/python benchmarks/rl_stability.py --seeds 1 --iters 20     # a quick look
    .venv/bin/python benchmarks/rl_stability.py --json /tmp/rl.json --out /tmp/rl.png

The policy is a small autoregressive GRU over digit tokens (hundreds of updates take seconds on a CPU), on
two tasks with verifiable rewards (share of answer positions right):
- short: answer a 4-digit prompt with its reversal (4 answer tokens);
- long: answer an 8-digit prompt with 64 tokens, token j = (prompt[j mod 8] + j div 8) mod 10, so the
  FiberPO rollback band C/T has the width it has at LLM answer lengths (T = 64, not 4).
Every algorithm sees the same prompts, initial weights and sampling seeds; they differ only in the policy
loss (flashops.trainers.losses, with the trainer's defaults from api.spec.RLParams). Many policy updates
per rollout batch make the later updates far off-policy: that is where the losses differ.

Recorded per rollout batch, over its response tokens, after its last update (the policy about to sample
the next batch against the one that sampled this one):
- mean |log r| and the k3 KL estimate E[exp(d) - d - 1], d = log pi_old - log pi (the drift measures);
- the clip fraction (GRPO, GSPO) or the gated fraction (FiberPO, trajectories in or past the rollback band);
- mean and max ratio, policy entropy, batch reward; held-out greedy-free (sampled) reward every few batches.
The mean ratio is printed but is NOT a stability measure: for tokens sampled from pi_old its expectation is
1 for any policy. Per algorithm the table gives the median over seeds and the spread (min..max) of each
run's mean over iterations; `final_reward` is the held-out reward at the end.

What this toy can and cannot reproduce of the FiberPO paper (arXiv 2603.08239):
- can: FiberPO's trajectory gate and clipped fiber residual bound how far the policy moves from the rollout
  policy per batch (lower mean |log r| and k3 KL than GRPO's token clip), at short and LLM-like lengths;
  on-policy it is the plain policy gradient (tests/trainers/test_losses.py).
- cannot: GRPO's collapse after ~60 steps at LLM scale (mean ratio > 1e3), GSPO's stagnation, and the
  AIME24 gain (0.668 -> 0.786): those need a large model, long reasoning answers and many steps. A GRU on
  digit tasks shows the mechanism (drift), not the benchmark numbers.
- where it fails, and why (the long task at the default lr 1e-2): FiberPO drifts MORE than GRPO there. The
  rollback band is C/T wide in log s: 0.25/64 = 0.004 for C+ at T = 64. One Adam step at lr 1e-2 moves a
  trajectory's mean positive log-ratio by ~0.15, so trajectories jump from inside the trust region straight
  past the band (after 3 of the 16 updates, 100% of the batch is beyond it), where the gate is flat (g = 0):
  nothing pulls them back, while the clipped fiber residual and the other trajectories' gradients keep
  moving the shared weights. GRPO's token clip instead zeroes each moved token's gradient. This is the loss
  as the paper defines it (tests/trainers/test_losses.py), not a benchmark bug: its trust region assumes
  steps smaller than C/T, as LLM learning rates (~1e-6) give. Measured (seeds 0..2, 40 batches, lr 1e-2,
  2026-12-02): long, FiberPO k3 KL 12.6 vs GRPO 0.39, entropy 0.08 vs 1.54, no algorithm above chance reward.
  At lr 1e-3 (seed 0, 3 batches) FiberPO's trajectories stay inside the band (<= 6% gated) and drift stays
  bounded (mean |log r| <= 0.21 after 16 updates), but still above GRPO's token clip (<= 0.13).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashops.api.spec import RLParams
from flashops.model.sampling import sample_tokens
from flashops.trainers.losses import POLICY_LOSSES, group_advantages

V, BOS = 10, 10  # digits 0..9, plus a start-of-answer token


@dataclass(frozen=True)
class Task:
    name: str
    prompt_len: int
    answer_len: int

    def targets(self, prompts: torch.Tensor) -> torch.Tensor:
        """The right answer for each prompt, [N, answer_len]."""
        j = torch.arange(self.answer_len)
        if self.name == "short":
            return prompts.flip(1)
        return (prompts[:, j % self.prompt_len] + j // self.prompt_len) % V


TASKS = {"short": Task("short", 4, 4), "long": Task("long", 8, 64)}


class ToyPolicy(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.emb = nn.Embedding(V + 1, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, V)

    def forward(self, tokens):  # (B, L) -> logits (B, L, V) for the NEXT token
        h, _ = self.rnn(self.emb(tokens))
        return self.head(h)


@torch.no_grad()
def sample(policy, prompts, group, task: Task, gen):
    x = prompts.repeat_interleave(group, 0)
    x = torch.cat([x, torch.full((x.shape[0], 1), BOS)], 1)
    h = None
    out, state = policy.rnn(policy.emb(x))  # one pass over the prompt, then one step per token
    logits = policy.head(out[:, -1])
    answer = []
    for _ in range(task.answer_len):
        nxt = sample_tokens(logits, 1.0, generator=gen).unsqueeze(1)
        answer.append(nxt)
        h, state = policy.rnn(policy.emb(nxt), state)
        logits = policy.head(h[:, -1])
    return torch.cat([x, *answer], 1)


def answer_logprobs(policy, seqs, task: Task):
    logits = policy(seqs[:, :-1])[:, task.prompt_len:]  # predictions of the answer tokens
    targets = seqs[:, task.prompt_len + 1:]
    logp = torch.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def rewards_of(seqs, task: Task):
    prompt = seqs[:, :task.prompt_len]
    answer = seqs[:, task.prompt_len + 1:]
    return (answer == task.targets(prompt)).float().mean(-1)


def loss_kwargs_for(algorithm: str, args) -> dict:
    """The trainer's own defaults (api.spec.RLParams), overridden only where a flag says so."""
    gspo = {"gspo_eps_low": args.gspo_eps_low, "gspo_eps_high": args.gspo_eps_high} if algorithm == "gspo" else {}
    return RLParams(algorithm=algorithm, eps=args.eps, delta=args.delta, **gspo).policy_loss_kwargs()


HISTORY_KEYS = ("reward", "mean_abs_log_ratio", "kl_k3", "clip_fraction", "ratio_mean", "ratio_max", "entropy")


def run(algorithm: str, task: Task, seed: int, args) -> dict:
    torch.manual_seed(seed)
    policy = ToyPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(seed + 1)
    pool = torch.randint(0, V, (args.pool, task.prompt_len), generator=data_gen)
    sample_gen = torch.Generator().manual_seed(seed + 2)
    loss_fn, loss_kwargs = POLICY_LOSSES[algorithm], loss_kwargs_for(algorithm, args)
    hist = {k: [] for k in HISTORY_KEYS} | {"eval_reward": []}
    eval_prompts = torch.randint(0, V, (256, task.prompt_len), generator=torch.Generator().manual_seed(seed + 3))
    for it in range(args.iters):
        idx = torch.randint(0, args.pool, (args.prompts,), generator=data_gen)
        seqs = sample(policy, pool[idx], args.group, task, sample_gen)
        r = rewards_of(seqs, task)
        adv = group_advantages(r, args.group).unsqueeze(1).expand(-1, task.answer_len).contiguous()
        mask = torch.ones_like(adv)
        with torch.no_grad():
            old, _ = answer_logprobs(policy, seqs, task)
        fractions = []
        for _ in range(args.updates):
            lp, _ = answer_logprobs(policy, seqs, task)
            loss, stats = loss_fn(lp, old, adv, mask, **loss_kwargs)
            fractions.append(float(stats.get("gated_fraction", stats.get("clip_fraction", 0.0))))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            lp, ent = answer_logprobs(policy, seqs, task)
            log_r = lp - old
            d = -log_r
        hist["reward"].append(float(r.mean()))
        hist["mean_abs_log_ratio"].append(float(log_r.abs().mean()))
        hist["kl_k3"].append(float((torch.exp(d) - d - 1).mean()))
        hist["clip_fraction"].append(sum(fractions) / len(fractions))
        hist["ratio_mean"].append(float(torch.exp(log_r).mean()))
        hist["ratio_max"].append(float(torch.exp(log_r).max()))
        hist["entropy"].append(float(ent.mean()))
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iters:
            with torch.no_grad():
                es = sample(policy, eval_prompts, 1, task, torch.Generator().manual_seed(seed + 4))
            hist["eval_reward"].append((it + 1, float(rewards_of(es, task).mean())))
    return hist


def mean_over_iterations(hist: dict) -> dict:
    """One run's summary: each drift measure's mean over iterations (non-finite values count as inf)."""
    out = {}
    for k in HISTORY_KEYS:
        xs = hist[k]
        out[k] = sum(xs) / len(xs) if all(math.isfinite(x) for x in xs) else float("inf")
    out["final_reward"] = hist["eval_reward"][-1][1]
    return out


def median_and_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def plot(curves: dict, path: str) -> None:
    """curves[task][algorithm] = the first seed's history: drift per rollout batch, and held-out reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(curves)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(14, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for algo, hist in curves[task].items():
            axes[row, 0].plot(hist["mean_abs_log_ratio"], label=algo)
            axes[row, 1].plot(hist["kl_k3"], label=algo)
            axes[row, 2].plot(*zip(*hist["eval_reward"]), label=algo, marker=".")
        for col, (title, log) in enumerate((("mean |log r| after the batch's updates", True),
                                            ("k3 KL to the rollout policy", True), ("held-out reward", False))):
            ax = axes[row, col]
            ax.set_title(f"{task} answers ({TASKS[task].answer_len} tokens): {title}", fontsize=9)
            ax.set_xlabel("rollout batch")
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.suptitle(f"Policy drift per rollout batch, FiberPO vs GRPO vs GSPO (toy scale, seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example: benchmarks/rl_stability.py "
                                "--seeds 3 --tasks short,long --json /tmp/rl.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="short,long", help="comma-separated: short (4 tokens), long (64 tokens)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per algorithm and task; median and spread reported")
    p.add_argument("--iters", type=int, default=40, help="rollout batches per run")
    p.add_argument("--updates", type=int, default=16, help="policy updates per rollout batch")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--pool", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-2)
    defaults = RLParams()
    p.add_argument("--eps", type=float, default=defaults.eps, help="FiberPO token clip / GRPO clip")
    p.add_argument("--gspo-eps-low", type=float, default=defaults.gspo_eps_low, help="GSPO lower clip (its paper: 3e-4)")
    p.add_argument("--gspo-eps-high", type=float, default=defaults.gspo_eps_high, help="GSPO upper clip (its paper: 4e-4)")
    p.add_argument("--delta", type=float, default=defaults.delta)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default="rl_stability.png", help="the drift plot")
    p.add_argument("--json", default=None, help='write {"short"|"long": {algorithm: {mean_abs_log_ratio, kl_k3, '
                   'final_reward}}}: medians over seeds')
    args = p.parse_args()
    torch.set_num_threads(1)
    algorithms = ("fiberpo", "grpo", "gspo")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
    print(f"toy RL: {args.iters} rollout batches x {args.prompts} prompts x {args.group} samples, {args.updates} "
          f"updates per batch, Adam lr {args.lr}, {args.seeds} seeds; losses with the trainer's defaults: "
          + "; ".join(f"{a} {loss_kwargs_for(a, args)}" for a in algorithms))
    report, curves, started = {}, {}, time.time()
    cols = ("mean_abs_log_ratio", "kl_k3", "clip_fraction", "final_reward", "reward", "entropy", "ratio_mean", "ratio_max")
    for t in tasks:
        task = TASKS[t]
        runs = {a: [] for a in algorithms}
        for seed in range(args.seeds):
            for a in algorithms:
                hist = run(a, task, seed, args)
                runs[a].append(mean_over_iterations(hist))
                if seed == 0:
                    curves.setdefault(t, {})[a] = hist
        print(f"\n{t} answers ({task.answer_len} tokens): median over {args.seeds} seeds [min..max] of each run's "
              "mean over iterations (final_reward: held-out reward at the end)")
        print(f"{'algorithm':10s}" + "".join(f"{c:>26s}" for c in cols))
        report[t] = {}
        for a in algorithms:
            row = {c: median_and_spread([r[c] for r in runs[a]]) for c in cols}
            report[t][a] = {c: row[c][0] for c in ("mean_abs_log_ratio", "kl_k3", "final_reward")}
            print(f"{a:10s}" + "".join(f"{m:10.4g} [{lo:.3g}..{hi:.3g}]".rjust(26) for m, lo, hi in row.values()))
        f = report[t]["fiberpo"]
        for other in ("grpo", "gspo"):
            o = report[t][other]
            print(f"  FiberPO vs {other.upper()}: mean |log r| {f['mean_abs_log_ratio'] / o['mean_abs_log_ratio']:.2f}x, "
                  f"k3 KL {f['kl_k3'] / max(o['kl_k3'], 1e-12):.2f}x, held-out reward "
                  f"{f['final_reward']:.3f} vs {o['final_reward']:.3f}")
    print(f"\n{time.time() - started:.0f} s in all")
    plot(curves, args.out)
    print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
