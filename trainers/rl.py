"""The rl stage: rollouts with a KV cache, verifiable rewards, group-relative advantages, several policy
updates per rollout batch (FiberPO, GRPO or GSPO), the difficulty curriculum, optional KL to a reference and
an optional supervised term on the prompts' reference answers (rl.nllWeight, PPO-ptx's).

One training step = one rollout batch (promptsPerStep prompts x groupSize samples) followed by
updatesPerBatch optimizer steps on it. The first update is on-policy; the later ones are where the
ratio drifts and where the losses differ. Before the first and after the last step the policy answers
a held-out set of RL prompts (greedy and sampled), which `flashops run` prints side by side.

The curriculum as published (rl.curriculum): before the first step the starting policy answers each pool
prompt profileRollouts times (batched, with a progress bar); prompts it always solves are dropped (with
dropUnsolved, also those it never solves) and the rest start at their profiled pass rate. A prompt's rollouts are
posed in thinking mode in the share the steps pose it (rl.thinkingRatio). The profile is in
the checkpointed stage state: a resumed run does not profile again.

    from flashops.trainers.rl import generate, evaluate
    completions = generate(model, [prompt_ids], n=4, max_new=16, temperature=1.0, generator=g, eos=1)
"""
from __future__ import annotations

import logging
import random
import time

import torch

from flashops.model.sampling import sample_tokens
from flashops.trainers.corpora import BuiltinDataset, eval_tasks, row_task, task_messages
from flashops.trainers.curriculum import CurriculumSampler, solved_and_unsolved, target_pass_rate
from flashops.trainers.losses import POLICY_LOSSES, group_advantages, kl_penalty
from flashops.trainers.stages import (Stage, _to_tensor, mtp_loss_sum, mtp_loss_weight, policy_forward,
                                      split_micro)
from flashops.trainers.tasks import DOMAINS, Task, correct, reward

log = logging.getLogger("flashops.trainers")
PROFILE_CHUNK = 32  # prompts per profiling generate() call (x profileRollouts rows): bounds its KV cache


def _reset_expert_counts(model) -> None:
    """Rollout and evaluation forwards must not count toward the router-bias update's load."""
    for moe in getattr(model, "moe_layers", []):
        counts = moe.tokens_per_expert_E
        (counts.to_local() if hasattr(counts, "to_local") else counts).zero_()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def rollout_generator(model, seed: int) -> torch.Generator:
    """A seeded generator on the model's device, where the rollouts' tokens are drawn."""
    return torch.Generator(device=model_device(model)).manual_seed(seed)


@torch.no_grad()
def generate(model, prompts: list[list[int]], n: int, max_new: int, temperature: float,
             generator: torch.Generator | None, eos: int, pad: int = 2, stop_early: bool = True) -> list[list[int]]:
    """n completions per prompt (prompt-major order), each up to max_new tokens ending at the first eos.
    Rows whose prompts have the same length are decoded together with one KV cache, on the model's device."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    out: list[list[int] | None] = [None] * (len(prompts) * n)
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    for length in sorted(buckets):
        rows = [(i, j) for i in buckets[length] for j in range(n)]
        x = torch.tensor([prompts[i] for i, _ in rows], dtype=torch.long, device=device)
        b = x.shape[0]
        cache = model.new_cache(b, length + max_new)
        logits = model(x, cache=cache, start_pos=0).logits[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        gen = torch.full((b, max_new), pad, dtype=torch.long, device=device)
        for t in range(max_new):
            nxt = sample_tokens(logits, temperature, generator=generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            gen[:, t] = nxt
            done |= nxt == eos
            if (stop_early and bool(done.all())) or t + 1 == max_new:
                break
            logits = model(nxt.unsqueeze(1), cache=cache, start_pos=length + t).logits[:, -1]
        gen = gen.cpu()
        for k, (i, j) in enumerate(rows):
            ids = gen[k].tolist()
            out[i * n + j] = ids[: ids.index(eos) + 1] if eos in ids else ids
    _reset_expert_counts(model)
    model.train(was_training)
    return out  # type: ignore[return-value]


def evaluate(model, tasks: list[Task], codec, max_new: int = 16, samples: int = 4, temperature: float = 1.0,
             seed: int = 0) -> dict:
    """Greedy accuracy and sampled mean reward on `tasks`, overall and per domain."""
    prompts = task_prompts(codec, tasks)
    greedy = generate(model, prompts, 1, max_new, 0.0, None, codec.eos, codec.pad)
    g = rollout_generator(model, seed)
    sampled = generate(model, prompts, samples, max_new, temperature, g, codec.eos, codec.pad)
    per_domain: dict[str, list[float]] = {}
    g_scores, s_scores = [], []
    for i, t in enumerate(tasks):
        gs = float(correct(t, codec.decode(greedy[i])))
        ss = sum(reward(t, codec.decode(sampled[i * samples + j])) for j in range(samples)) / samples
        g_scores.append(gs)
        s_scores.append(ss)
        per_domain.setdefault(t.domain, []).append(gs)
    return {
        "greedy_accuracy": sum(g_scores) / len(g_scores),
        "sampled_reward": sum(s_scores) / len(s_scores),
        "per_domain_greedy": {d: sum(v) / len(v) for d, v in sorted(per_domain.items())},
        "prompts": len(tasks),
        "examples": [{"question": tasks[i].question, "expected": tasks[i].answer,
                      "answer": codec.decode(greedy[i]).replace("<eos>", "")} for i in range(0, len(tasks), max(1, len(tasks) // 4))][:4],
    }


def task_prompts(codec, tasks: list[Task], thinking: bool | list[bool] = False) -> list[list[int]]:
    """Each task's question as a user turn, ending where the policy starts writing: in thinking mode (one flag
    for all, or one per task) the prompt opens <think>, else it closes it at once."""
    modes = thinking if isinstance(thinking, list) else [thinking] * len(tasks)
    return [codec.prompt([{"role": "user", "content": t.question}], thinking=th) for t, th in zip(tasks, modes)]


def thinking_modes(n: int, ratio: float, seed: int, step: int) -> list[bool]:
    """Which of a step's n prompts are posed in thinking mode: round(ratio x n) of them, a seeded choice per
    step (so a rerun or a resumed run poses the same prompts the same way)."""
    chosen = set(random.Random(f"thinking:{seed}:{step}").sample(range(n), round(ratio * n)))
    return [i in chosen for i in range(n)]


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], n: int, width: int, pad: int):
    """tokens (N, W) = prompt + completion (right-padded) and the response mask on targets (N, W-1)."""
    seqs, masks = [], []
    for k, c in enumerate(completions):
        p = prompts[k // n]
        seqs.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    w = min(width, max(len(s) for s in seqs))
    tokens = _to_tensor(seqs, w, pad)
    mask = _to_tensor(masks, w, 0)[:, 1:]
    return tokens, mask


class RLStage(Stage):
    name = "rl"

    def __init__(self, trainer):
        super().__init__(trainer)
        spec = trainer.spec
        self.p = spec.rl
        self.seed = spec.training.seed
        domains = tuple(self.p.domains or DOMAINS)
        if isinstance(self.dataset, BuiltinDataset):
            self.pool = [t for t in self.dataset.pool if t.domain in domains]
            self.eval_set = eval_tasks(4, self.seed, domains)
        else:
            self.pool = [row_task(r) for r in self.dataset.rows]
            self.eval_set = self.pool[: min(48, len(self.pool))]
        self.sampler = CurriculumSampler([t.domain for t in self.pool], spec.training.steps, self.p.curriculum.enabled)
        self.profile_stats: dict = {}  # set when this process profiled; reported with the first step
        self.loss_fn = POLICY_LOSSES[self.p.algorithm]
        self.mtp_weight = mtp_loss_weight(trainer, self.p.mtp)
        self.reference = self.tr.frozen_reference() if self.p.kl_coef > 0 else None
        self.eval_before = evaluate(trainer.model, self.eval_set, self.codec, self.p.max_new_tokens,
                                    temperature=self.p.temperature, seed=self.seed)

    def state_dict(self) -> dict:
        return {"cursor": torch.tensor(self.cursor), "curriculum": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.sampler.load_state_dict(state["curriculum"])

    def on_start(self) -> None:
        c = self.p.curriculum
        if c.enabled and c.profile and not self.sampler.profiled:  # a resumed run has its profile already
            self.profile()

    def profile(self) -> dict:
        """The paper's profiling: pass rate of each pool prompt (or a seeded subset of profileMaxPrompts) from
        profileRollouts sampled rollouts of the starting policy; solved prompts leave the pool (dropSolved)."""
        c, p = self.p.curriculum, self.p
        t0 = time.time()
        idx = list(range(len(self.pool)))
        if c.profile_max_prompts is not None and c.profile_max_prompts < len(idx):
            idx = sorted(random.Random(f"profile:{self.seed}").sample(idx, c.profile_max_prompts))
        g = rollout_generator(self.tr.model, self.seed * 1_000_003 - 1)  # not any step's rollout seed
        rates: list[float] = []
        k = c.profile_rollouts
        modes = [j < round(p.thinking_ratio * k) for j in range(k)]
        self.tr.progress("profiling", 0, len(idx))
        for start in range(0, len(idx), PROFILE_CHUNK):
            tasks = [self.pool[i] for i in idx[start:start + PROFILE_CHUNK]]
            # each prompt's k rollouts in the modes the steps pose it in (rl.thinkingRatio of them thinking), so
            # its profiled pass rate is the one the online updates go on to average
            prompts = task_prompts(self.codec, [t for t in tasks for _ in range(k)], modes * len(tasks))
            completions = generate(self.tr.model, prompts, 1, p.max_new_tokens, p.temperature, g, self.codec.eos,
                                   self.codec.pad, stop_early=self.tr.dist.world_size == 1)
            for j, t in enumerate(tasks):
                rates.append(sum(correct(t, self.codec.decode(c_)) for c_ in completions[j * k:(j + 1) * k]) / k)
            self.tr.progress("profiling", len(rates), len(idx))
        dropped = self.sampler.set_profile(rates, k, c.drop_solved, idx, c.drop_unsolved)
        solved, unsolved = (int(m.sum()) for m in solved_and_unsolved(torch.tensor(rates)))
        self.profile_stats = {"profile_prompts": len(idx), "profile_rollouts": len(idx) * k,
                              "profile_pass_rate": sum(rates) / len(rates), "profile_solved": solved,
                              "profile_unsolved": unsolved, "profile_dropped": dropped,
                              "pool_active": int(self.sampler.active.sum()), "profile_seconds": time.time() - t0}
        droppable = [f"{n} {what}" for n, what, on in ((solved, "solved", c.drop_solved),
                                                         (unsolved, "never-solved", c.drop_unsolved)) if on and n]
        if droppable and not dropped:
            log.warning("curriculum: dropping the %s profiled prompts would empty the pool; none dropped (RL has "
                        "little to learn from them: use other prompts or another rl.domains)", " and ".join(droppable))
        log.info("curriculum profile: %d prompts x %d rollouts, mean pass rate %.3f, %d solved, %d never solved, "
                 "%d dropped, %d in the pool (%.1fs)", len(idx), k, self.profile_stats["profile_pass_rate"], solved,
                 unsolved, dropped, self.profile_stats["pool_active"], self.profile_stats["profile_seconds"])
        return self.profile_stats

    def train_step(self, step: int) -> dict:
        tr, p = self.tr, self.p
        idx = self.sampler.sample(step, p.prompts_per_step, self.seed)
        tasks = [self.pool[i] for i in idx]
        thinking = thinking_modes(len(tasks), p.thinking_ratio, self.seed, step)
        prompts = task_prompts(self.codec, tasks, thinking)
        g = rollout_generator(tr.model, self.seed * 1_000_003 + step)
        completions = generate(tr.model, prompts, p.group_size, p.max_new_tokens, p.temperature, g,
                               self.codec.eos, self.codec.pad, stop_early=tr.dist.world_size == 1)
        texts = [self.codec.decode(c) for c in completions]
        rewards = torch.tensor([reward(tasks[k // p.group_size], t, p.partial_credit) for k, t in enumerate(texts)],
                               dtype=torch.float32)
        solved = torch.tensor([correct(tasks[k // p.group_size], t) for k, t in enumerate(texts)], dtype=torch.float32)
        solved_per_prompt = solved.view(-1, p.group_size).mean(-1).tolist()
        self.sampler.update(idx, solved_per_prompt, rollouts=p.group_size)
        self.cursor += len(idx)
        adv = group_advantages(rewards, p.group_size)
        tokens, mask = rollout_batch(prompts, completions, p.group_size, self.seq_len + 1, self.codec.pad)
        adv_tok = adv.unsqueeze(1).expand_as(mask).contiguous().float()
        n_global = tokens.shape[0]
        micro = tr.spec.training.micro_batch_size or n_global
        # every rank sampled the same rollouts (same seed); each scores and trains on its share of them, on its device
        rank, world = tr.dist.rank, tr.dist.world_size
        tokens, mask, adv_tok = (t[rank::world].to(tr.device) for t in (tokens, mask, adv_tok))
        n = tokens.shape[0]
        with torch.no_grad():
            # every log-prob is of the distribution the rollouts were drawn from: softmax(logits / temperature)
            old = torch.cat([policy_forward(tr.model, tokens[sl], temperature=p.temperature)[0]
                             for sl in split_micro(n, micro)])
            ref = (torch.cat([policy_forward(self.reference, tokens[sl], temperature=p.temperature)[0]
                              for sl in split_micro(n, micro)])
                   if self.reference is not None else None)
        _reset_expert_counts(tr.model)
        gold = ([t.to(tr.device) for t in self.reference_answers(tasks, thinking)]
                if p.nll_weight > 0 else None)
        losses, ratio_mean, ratio_max, entropy, kls, drift, mtp_loss = [], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        n_resp = max(tr.all_sum(float(mask.sum())), 1.0)  # response tokens of the global batch
        for _ in range(p.updates_per_batch):
            total, mtp_total = 0.0, 0.0
            r_sum, r_max, ent_sum, kl_sum, drift_sum = 0.0, 0.0, 0.0, 0.0, 0.0
            for sl in split_micro(n, micro):
                lp, out = policy_forward(tr.model, tokens[sl], mtp=self.mtp_weight > 0, temperature=p.temperature)
                logits = out.logits.float() / p.temperature
                loss, st = self.loss_fn(lp, old[sl], adv_tok[sl], mask[sl], **p.policy_loss_kwargs())
                if ref is not None:
                    kl = kl_penalty(lp, ref[sl], mask[sl])
                    loss = loss + p.kl_coef * kl
                    kl_sum += float(kl.detach()) * lp.shape[0] / n_global
                frac = lp.shape[0] / n_global  # a share of the global batch; FSDP sums over ranks
                total += float(loss.detach()) * frac
                loss = loss * frac
                if self.mtp_weight > 0:  # rl.mtp: the MTP layer learns the policy's own rollouts
                    mtp_sum = mtp_loss_sum(out, tokens[sl], mask[sl])
                    loss = loss + self.mtp_weight * mtp_sum / n_resp
                    mtp_total += float(mtp_sum.detach()) / n_resp
                tr.backward(loss)
                with torch.no_grad():
                    m = mask[sl].float()
                    ratio = torch.exp((lp - old[sl]) * m)
                    r_sum += float((ratio * m).sum())
                    drift_sum += float(((lp - old[sl]).abs() * m).sum())  # mean |log r|: the ratio's drift
                    r_max = max(r_max, float((ratio * m).max()))
                    logp = torch.log_softmax(logits, -1)  # the rollout distribution's entropy
                    ent = -(logp.exp() * logp).sum(-1)
                    ent_sum += float((ent * m).sum())
            if gold is not None:  # rl.nllWeight: every rank takes the whole batch (one row a prompt) at 1/world
                g_tokens, g_mask, g_count = gold
                nll_total = 0.0
                for sl in split_micro(g_tokens.shape[0], micro):
                    lp, _ = policy_forward(tr.model, g_tokens[sl])
                    nll = -(lp * g_mask[sl]).sum() / g_count
                    tr.backward(p.nll_weight * nll / world)
                    nll_total += float(nll.detach())
            stats = tr.optimizer_step()
            losses.append(tr.all_sum(total))
            mtp_loss = tr.all_sum(mtp_total)
            ratio_mean, entropy, kls = tr.all_sum(r_sum) / n_resp, tr.all_sum(ent_sum) / n_resp, tr.all_sum(kl_sum)
            drift = tr.all_sum(drift_sum) / n_resp
            ratio_max = -tr.all_min(-r_max) if world > 1 else r_max
        if p.thinking_ratio > 0:  # each mode's share of the solved rollouts, to see whether both improve
            for mode, on in (("thinking", True), ("non_thinking", False)):
                rows = [r for r, th in zip(solved_per_prompt, thinking) if th == on]
                if rows:
                    stats[f"solved_{mode}"] = sum(rows) / len(rows)
        stats.update(loss=sum(losses) / len(losses), reward=float(rewards.mean()), solved=float(solved.mean()), ratio_mean=ratio_mean,
                     ratio_max=ratio_max, ratio_drift=drift, entropy=entropy, response_len=n_resp / n_global,
                     target_pass_rate=target_pass_rate(step, tr.spec.training.steps),
                     tokens=int(tokens.numel()) * world * (p.updates_per_batch + 1))
        if self.reference is not None:
            stats["kl"] = kls
        if self.mtp_weight > 0:
            stats["mtp_loss"] = mtp_loss
        if gold is not None:
            stats["reference_nll"] = nll_total
        stats.update(self.profile_stats)  # once: the row of the first step after profiling
        self.profile_stats = {}
        return stats

    def reference_answers(self, tasks: list[Task], thinking: list[bool]):
        """(tokens, target mask, target count) of the step's prompts with their reference answers, each in the
        mode the step poses it: in thinking mode the task's worked reasoning, then the answer. A task without
        reasoning (a user row may have none) has no thinking-mode reference: an empty one would teach skipping it."""
        chats = [self.codec.chat(task_messages(t), th) for t, th in zip(tasks, thinking)]
        width = min(max(len(ids) for ids, _ in chats), self.seq_len + 1)
        tokens = _to_tensor([ids for ids, _ in chats], width, self.codec.pad)
        has_reference = [not th or bool(t.reasoning.strip()) for t, th in zip(tasks, thinking)]
        mask = _to_tensor([m if ok else [0] * len(m) for (_, m), ok in zip(chats, has_reference)], width, 0)
        mask = mask[:, 1:].float()
        return tokens, mask, mask.sum().clamp(min=1)

    def on_end(self) -> dict:
        after = evaluate(self.tr.model, self.eval_set, self.codec, self.p.max_new_tokens,
                         temperature=self.p.temperature, seed=self.seed)
        return {"eval_before": self.eval_before, "eval_after": after}
