"""RL stability at toy scale: FiberPO vs GRPO vs GSPO with several policy updates per rollout batch.

    .venv/bin/python benchmarks/rl_stability.py                      # prints figures, writes rl_stability.png
    .venv/bin/python benchmarks/rl_stability.py --iters 200 --updates 8 --lr 3e-3 --out /tmp/rl.png

The policy is a small autoregressive GRU over digit tokens (so hundreds of iterations take seconds on a
CPU); the task has a verifiable reward: answer a 4-digit prompt with its reversal, reward = share of
positions right. Every algorithm sees the same prompts, the same initial weights and the same sampling
seeds; they differ only in the policy loss (flashops.trainers.losses, the functions the trainer uses).
With many updates per rollout batch the later updates are far off-policy: this is where the token
ratio pi_theta / pi_old drifts. Recorded per iteration, over the response tokens of the batch at its
last update: mean and max ratio; and the policy's entropy and the batch reward.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from flashops.trainers.losses import POLICY_LOSSES, group_advantages

V, PROMPT_LEN, ANSWER_LEN, BOS = 10, 4, 4, 10  # digits 0..9, plus a start-of-answer token


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
def sample(policy, prompts, group, gen):
    x = prompts.repeat_interleave(group, 0)
    x = torch.cat([x, torch.full((x.shape[0], 1), BOS)], 1)
    for _ in range(ANSWER_LEN):
        logits = policy(x)[:, -1]
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        x = torch.cat([x, nxt], 1)
    return x


def answer_logprobs(policy, seqs):
    logits = policy(seqs[:, :-1])[:, PROMPT_LEN:]  # predictions of the answer tokens
    targets = seqs[:, PROMPT_LEN + 1:]
    logp = torch.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def rewards_of(seqs):
    prompt = seqs[:, :PROMPT_LEN]
    answer = seqs[:, PROMPT_LEN + 1:]
    return (answer == prompt.flip(1)).float().mean(-1)


def run(algorithm: str, args) -> dict:
    torch.manual_seed(args.seed)
    policy = ToyPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    pool = torch.randint(0, V, (args.pool, PROMPT_LEN), generator=data_gen)
    sample_gen = torch.Generator().manual_seed(args.seed + 2)
    loss_fn = POLICY_LOSSES[algorithm]
    eps = args.gspo_eps if algorithm == "gspo" else args.eps
    hist = {k: [] for k in ("reward", "ratio_mean", "ratio_max", "entropy", "eval_reward")}
    eval_prompts = torch.randint(0, V, (256, PROMPT_LEN), generator=torch.Generator().manual_seed(args.seed + 3))
    for it in range(args.iters):
        idx = torch.randint(0, args.pool, (args.prompts,), generator=data_gen)
        seqs = sample(policy, pool[idx], args.group, sample_gen)
        r = rewards_of(seqs)
        adv = group_advantages(r, args.group).unsqueeze(1).expand(-1, ANSWER_LEN).contiguous()
        mask = torch.ones_like(adv)
        with torch.no_grad():
            old, _ = answer_logprobs(policy, seqs)
        for _ in range(args.updates):
            lp, ent = answer_logprobs(policy, seqs)
            loss, _ = loss_fn(lp, old, adv, mask, eps=eps, delta=args.delta)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            lp, ent = answer_logprobs(policy, seqs)
            ratio = torch.exp(lp - old)
        hist["reward"].append(float(r.mean()))
        hist["ratio_mean"].append(float(ratio.mean()))
        hist["ratio_max"].append(float(ratio.max()))
        hist["entropy"].append(float(ent.mean()))
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iters:
            with torch.no_grad():
                es = sample(policy, eval_prompts, 1, torch.Generator().manual_seed(args.seed + 4))
            hist["eval_reward"].append((it + 1, float(rewards_of(es).mean())))
    return hist


def summarise(hist: dict, last: int) -> dict:
    tail = slice(-last, None)
    finite = [x for x in hist["ratio_mean"] if math.isfinite(x)]
    return {
        "final_reward": sum(hist["reward"][tail]) / len(hist["reward"][tail]),
        "final_eval_reward": hist["eval_reward"][-1][1],
        "best_eval_reward": max(v for _, v in hist["eval_reward"]),
        "mean_ratio_avg": sum(finite) / max(len(finite), 1),
        "mean_ratio_peak": max(finite) if finite else float("nan"),
        "max_ratio_peak": max(hist["ratio_max"]),
        "final_entropy": sum(hist["entropy"][tail]) / len(hist["entropy"][tail]),
        "min_entropy": min(hist["entropy"]),
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for name, hist in results.items():
        axes[0, 0].plot(*zip(*hist["eval_reward"]), label=name, marker=".")
        axes[0, 1].plot(hist["ratio_mean"], label=name)
        axes[1, 0].plot(hist["ratio_max"], label=name)
        axes[1, 1].plot(hist["entropy"], label=name)
    for ax, title, log in ((axes[0, 0], "held-out reward (sampled)", False), (axes[0, 1], "mean token ratio at last update", True),
                           (axes[1, 0], "max token ratio at last update", True), (axes[1, 1], "policy entropy (nats)", False)):
        ax.set_title(title)
        ax.set_xlabel("rollout batch")
        if log:
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle("FiberPO vs GRPO vs GSPO, several policy updates per rollout batch (toy scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--updates", type=int, default=16, help="policy updates per rollout batch")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--pool", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--gspo-eps", type=float, default=0.2, help="GSPO's sequence-ratio clip (its paper: 3e-4..4e-4)")
    p.add_argument("--delta", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default="rl_stability.png")
    p.add_argument("--json", default=None, help="also write the per-iteration histories here")
    args = p.parse_args()
    torch.set_num_threads(1)
    results, summary = {}, {}
    for algo in ("fiberpo", "grpo", "gspo"):
        t0 = time.time()
        results[algo] = run(algo, args)
        summary[algo] = summarise(results[algo], last=10) | {"seconds": time.time() - t0}
    print(f"toy RL: {args.iters} rollout batches x {args.prompts} prompts x {args.group} samples, "
          f"{args.updates} updates per batch, Adam lr {args.lr}, eps {args.eps}, delta {args.delta}, seed {args.seed}")
    cols = ("final_reward", "final_eval_reward", "best_eval_reward", "mean_ratio_avg", "mean_ratio_peak",
            "max_ratio_peak", "final_entropy", "min_entropy", "seconds")
    print(f"{'algorithm':10s}" + "".join(f"{c:>18s}" for c in cols))
    for algo, s in summary.items():
        print(f"{algo:10s}" + "".join(f"{s[c]:18.4g}" for c in cols))
    f, g = summary["fiberpo"], summary["grpo"]
    print(f"FiberPO final held-out reward / GRPO: {f['final_eval_reward'] / max(g['final_eval_reward'], 1e-9):.3f}x; "
          f"mean ratio peak FiberPO {f['mean_ratio_peak']:.3f} vs GRPO {g['mean_ratio_peak']:.3f} vs GSPO "
          f"{summary['gspo']['mean_ratio_peak']:.3f}")
    plot(results, args.out)
    print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "history": results}, fh)


if __name__ == "__main__":
    main()
