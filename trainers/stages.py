"""The supervised stages: pretrain (next token + MTP), sft (assistant tokens only, best-fit packing) and
dpo (frozen reference, sigmoid loss). rl lives in rl.py; flashops.trainers.registry.STAGES maps a stage name
to its class (this module imports neither rl nor the registry). A stage gets a StageContext, not the trainer,
turns step s into micro-batches and losses, and the engine does the rest.

Data position: each stage keeps a cursor that is saved in every checkpoint, so a resumed run sees exactly the
examples it would have seen: the index of the next example for the builtin corpora, a loader's state for
user data (trainers/loader.py: a global cursor for prepared token shards, one (epoch, position) per batch
row for raw rows, which each rank reads only its share of).
Losses are normalised by the whole batch's token (or pair) count, so gradient accumulation over
micro-batches gives the same update as one big batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flashops.model.tokenizer import TokenizerCodec
from flashops.trainers.corpora import response_messages
from flashops.trainers.losses import dpo_loss, masked_ce, token_logprobs

IGNORE = 0  # mask value
log = logging.getLogger("flashops.trainers")


@dataclass
class Packed:
    tokens: torch.Tensor     # (B, L+1) token ids
    positions: torch.Tensor  # (B, L+1) position within its document (restarts at 0)
    mask: torch.Tensor       # (B, L+1) 1 where the token is a training target
    local: bool = False      # True: only this rank's rows (a prepared dataset's loader), not the global batch


def split_micro(batch_size: int, micro: int) -> list[slice]:
    return [slice(i, i + micro) for i in range(0, batch_size, micro)]


def _to_tensor(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class StageContext:
    """What a stage may use of the trainer, and nothing else: the spec, the preflight plan, the model (read when
    used: the engine may wrap it for FSDP after the stage is built), the process group, and the engine's backward,
    optimizer step, cross-rank reductions, frozen reference policy and progress report (phase, done, total)."""

    def __init__(self, trainer):
        self._trainer = trainer
        self.spec = trainer.spec
        self.plan = trainer.plan
        self.backward = trainer.backward
        self.optimizer_step = trainer.optimizer_step
        self.all_sum = trainer.all_sum
        self.all_min = trainer.all_min
        self.frozen_reference = trainer.frozen_reference
        self.progress = trainer.progress

    @property
    def model(self):
        return self._trainer.model

    @property
    def dist(self):
        return self._trainer.dist

    @property
    def device(self) -> torch.device:
        """Where the model is: every batch a stage builds (on the CPU) goes there before its forward."""
        return torch.device(self._trainer.dist.device)


class Stage:
    name = "stage"

    def __init__(self, trainer: StageContext):
        self.tr = trainer  # a StageContext (the name `tr` is kept for the stage code below)
        self.codec = TokenizerCodec(skip_special_tokens=False)  # rewards read the closing <eos>
        self.cursor = 0
        spec = trainer.spec
        self.seq_len = spec.training.seq_len
        self.batch_size = spec.training.batch_size
        self.micro = trainer.plan.micro_batch_size
        self.dataset = trainer.plan.dataset
        self.loader = None  # set by stages that read prepared token shards (trainers/loader.py)

    def state_dict(self) -> dict:
        if self.loader is not None:
            out = {k: torch.as_tensor(v).clone() for k, v in self.loader.state_dict().items()}
            if getattr(self.loader, "per_rank", False) and self.tr.dist.world_size > 1:
                for k, t in out.items():  # each rank filled its own row streams: one table for the checkpoint
                    t = t.to(self.tr.device)  # NCCL reduces device tensors
                    torch.distributed.all_reduce(t)
                    out[k] = t.cpu()
            return out
        return {"cursor": torch.tensor(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        if self.loader is not None:
            self.loader.load_state_dict({k: state[k].numpy() if isinstance(state[k], torch.Tensor) else state[k]
                                         for k in self.loader.state_dict()})
            log.info("data cursor %s: rank %d reads %s next", self.loader.state_dict(), self.tr.dist.rank,
                     self.loader.where())
            return
        self.cursor = int(state["cursor"])

    def local_batch(self) -> Packed:
        """This rank's rows of the next batch from the loader (prepared token shards or raw row streams)."""
        b = self.loader.next_batch()
        self.packing_efficiency = b.efficiency
        if getattr(self.loader, "per_rank", False):  # raw row streams: the efficiency of this rank's rows
            self.packing_efficiency = self.tr.all_sum(b.efficiency * len(b.tokens)) / self.batch_size
        return Packed(torch.from_numpy(b.tokens), torch.from_numpy(b.positions), torch.from_numpy(b.mask), local=True)

    def on_end(self) -> dict:
        if self.loader is not None:
            self.loader.close()
        return {}

    def on_start(self) -> None:
        pass

    def next_example(self) -> dict:
        ex = self.dataset[self.cursor]
        self.cursor += 1
        return ex


# ------------------------------------------------------------------------------------------ pretrain


class PretrainStage(Stage):
    """Documents <bos> text <eos> packed back to back into rows of seqLen + 1 tokens (positions restart per
    document, so attention stays within it); next-token loss + mtpWeight x MTP loss from mtpFromStep."""

    name = "pretrain"

    def __init__(self, trainer):
        super().__init__(trainer)
        if is_prepared(self.dataset):
            from flashops.trainers.loader import PretrainLoader

            self.loader = PretrainLoader(self.dataset, self.seq_len, self.batch_size, trainer.spec.training.seed,
                                         trainer.dist.rank, trainer.dist.world_size)
        elif is_raw(self.dataset):
            from flashops.trainers.loader import RawPretrainLoader

            self.loader = RawPretrainLoader(self.dataset, self.seq_len, self.batch_size, trainer.dist.rank,
                                            trainer.dist.world_size,
                                            lambda row: (self.codec.documents([str(row["text"])])[0], None))

    def pack(self) -> Packed:
        width = self.seq_len + 1
        rows, pos, masks = [], [], []
        for _ in range(self.batch_size):
            ids, p = [], []
            while len(ids) < width:
                doc = self.codec.documents([self.next_example()["text"]])[0]
                ids += doc
                p += list(range(len(doc)))
            rows.append(ids[:width])
            pos.append(p[:width])
        tokens = _to_tensor(rows, width, self.codec.pad)
        positions = _to_tensor(pos, width, 0)
        mask = (positions > 0).long()  # a document's first token (<bos>) is never a target
        return Packed(tokens, positions, mask)

    def train_step(self, step: int) -> dict:
        params = self.tr.spec.pretrain
        mtp_on = params.mtp_weight > 0 and step >= params.mtp_from_step and self.tr.model.mtp is not None
        batch = self.local_batch() if self.loader is not None else self.pack()
        return supervised_step(self.tr, batch, mtp_weight=params.mtp_weight if mtp_on else 0.0)


def supervised_step(tr, batch: Packed, mtp_weight: float) -> dict:
    """Forward/backward over micro-batches of a packed batch, then one optimizer step."""
    model = tr.model
    inp, tgt = batch.tokens[:, :-1], batch.tokens[:, 1:]
    pos, mask = batch.positions[:, :-1], batch.mask[:, 1:]
    n_tok = mask.sum().clamp(min=1)
    # MTP logits at i come from the hidden state at i-1 of the same document: not at a document start
    mtp_mask = mask * (pos > 0).long()
    n_mtp = mtp_mask.sum().clamp(min=1)
    total_ce, total_mtp = 0.0, 0.0
    # data parallel: every rank packs the same global batch (cheap) and trains on its share of the rows;
    # losses stay normalised by the GLOBAL count, since torchtitan's FSDP sums the gradients over ranks
    rank, world = tr.dist.rank, tr.dist.world_size
    n_rows = inp.shape[0]
    if batch.local:  # a prepared dataset's loader read only this rank's rows: sum the counts over ranks
        n_tok, n_mtp, n_rows = global_counts(tr, mask.sum(), mtp_mask.sum(), n_rows)
    else:
        inp, tgt, pos, mask, mtp_mask = (t[rank::world] for t in (inp, tgt, pos, mask, mtp_mask))
    # only this rank's rows go to its device (a global batch is sliced first)
    inp, tgt, pos, mask, mtp_mask = (t.to(tr.device) for t in (inp, tgt, pos, mask, mtp_mask))
    for sl in split_micro(inp.shape[0], tr.plan.micro_batch_size):
        out = model(inp[sl], positions=pos[sl], mtp=mtp_weight > 0)
        ce_sum, _ = masked_ce(out.logits, tgt[sl], mask[sl])
        loss = ce_sum / n_tok
        if mtp_weight > 0 and out.mtp_logits is not None:
            mtp_sum, _ = masked_ce(out.mtp_logits, tgt[sl], mtp_mask[sl])
            loss = loss + mtp_weight * mtp_sum / n_mtp
            total_mtp += float(mtp_sum.detach()) / float(n_mtp)
        tr.backward(loss)
        total_ce += float(ce_sum.detach()) / float(n_tok)
    stats = tr.optimizer_step()
    stats.update(loss=tr.all_sum(total_ce), tokens=int(n_rows) * inp.shape[1] if batch.local else int(inp.numel()) * world)
    if mtp_weight > 0:
        stats["mtp_loss"] = tr.all_sum(total_mtp)
    return stats


def is_prepared(dataset) -> bool:
    from flashops.storage.datasets import TokenDataset

    return isinstance(dataset, TokenDataset)


def is_raw(dataset) -> bool:
    """User rows (JSONL/Parquet under file:// or s3://), streamed per rank (trainers/loader.py RawStreams)."""
    from flashops.trainers.corpora import RawDataset

    return isinstance(dataset, RawDataset)


def global_counts(tr, *values) -> list[torch.Tensor]:
    """Per-rank counts summed over ranks in one all-reduce (at least 1 each: they divide losses)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=tr.device)
    if tr.dist.world_size > 1:
        torch.distributed.all_reduce(t)
    return [x.clamp(min=1).long() for x in t]


# ------------------------------------------------------------------------------------------ sft


class SFTStage(Stage):
    """Conversations rendered with the chat template (thinking or not, per example), loss on assistant
    tokens only, packed best-fit: each conversation goes into the row with the least room that still
    fits it; the first one that fits nowhere starts the next batch."""

    name = "sft"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.ratio = trainer.spec.sft.thinking_ratio
        self.packing = trainer.spec.sft.packing
        if is_prepared(self.dataset):
            from flashops.trainers.loader import SFTLoader

            self.loader = SFTLoader(self.dataset, self.seq_len, self.batch_size, trainer.dist.rank,
                                    trainer.dist.world_size, self.packing)
        elif is_raw(self.dataset):
            from flashops.trainers.loader import RawSFTLoader

            self.loader = RawSFTLoader(self.dataset, self.seq_len, self.batch_size, trainer.dist.rank,
                                       trainer.dist.world_size, self.encode, self.packing)

    def encode(self, ex: dict) -> tuple[list[int], list[int]]:
        thinking = bool(ex.get("thinking", False))
        return self.codec.chat(ex["messages"], thinking)

    def pack(self) -> Packed:
        width = self.seq_len + 1
        rows: list[tuple[list, list, list]] = [([], [], []) for _ in range(self.batch_size)]
        if self.packing == "none":
            for ids, p, m in rows:
                e_ids, e_mask = self.encode(self.next_example())
                ids += e_ids[:width]
                m += e_mask[:width]
                p += list(range(len(ids)))
        else:
            while True:
                e_ids, e_mask = self.encode(self.dataset[self.cursor])
                e_ids, e_mask = e_ids[:width], e_mask[:width]
                room = [(width - len(r[0]), i) for i, r in enumerate(rows) if width - len(r[0]) >= len(e_ids)]
                if not room:
                    break
                _, best = min(room)
                ids, p, m = rows[best]
                p += list(range(len(e_ids)))
                ids += e_ids
                m += e_mask
                self.cursor += 1
        tokens = _to_tensor([r[0] for r in rows], width, self.codec.pad)
        positions = _to_tensor([r[1] for r in rows], width, 0)
        mask = _to_tensor([r[2] for r in rows], width, 0)
        return Packed(tokens, positions, mask)

    def train_step(self, step: int) -> dict:
        if self.loader is not None:
            batch = self.local_batch()
        else:
            batch = self.pack()
            width = batch.tokens.shape[0] * batch.tokens.shape[1]
            self.packing_efficiency = float((batch.tokens != self.codec.pad).sum()) / width
        stats = supervised_step(self.tr, batch, mtp_weight=mtp_loss_weight(self.tr, self.tr.spec.sft.mtp))
        stats["packing_efficiency"] = self.packing_efficiency  # filled / available tokens of the global batch
        return stats


# ------------------------------------------------------------------------------------------ dpo


def mtp_loss_weight(tr, setting) -> float:
    """The weight of a stage's MTP loss (sft/dpo/rl.mtp): its weight when train is on and the model has an
    MTP layer (preflight refuses an explicit train: true on a model without one), else 0."""
    return setting.weight if setting.train and tr.model.mtp is not None else 0.0


def policy_forward(model, tokens: torch.Tensor, mtp: bool = False, temperature: float = 1.0):
    """One forward over rows tokens (B, L+1): (log p of each target (B, L), the model's output). With mtp the
    output has MTP logits too, computed from the trunk's hidden states taken as constants: in post-training
    the MTP loss trains the MTP layer, not the policy's trunk (model.forward's mtp_trunk_grad).

    temperature: the log-probs are those of softmax(logits / temperature), the distribution RL rollouts are
    drawn from (model.sampling.token_probs); at 1 that is the model's own. The output keeps the raw logits."""
    out = model(tokens[:, :-1], mtp=mtp, mtp_trunk_grad=False)
    logits = out.logits if temperature == 1.0 else out.logits.float() / temperature
    return token_logprobs(logits, tokens[:, 1:]), out


def mtp_loss_sum(out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MTP layer's cross-entropy summed over the masked targets (mask (B, L) on tokens[:, 1:]) of a
    policy_forward(..., mtp=True) output; position 0 has no MTP prediction. Callers divide by the global count."""
    after_first = (torch.arange(mask.shape[1], device=mask.device) > 0).to(mask.dtype)
    ce, _ = masked_ce(out.mtp_logits, tokens[:, 1:], mask * after_first)
    return ce


def sequence_logprob(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over masked target positions: tokens (B, L+1), mask (B, L+1) on targets."""
    lp, _ = policy_forward(model, tokens)
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)


class DPOStage(Stage):
    """Pairs (prompt, chosen, rejected) in chat form, thinking or not per pair; the reference is a frozen copy of
    the starting policy (or dpo.reference); loss -log sigmoid(beta x (policy - reference) margin), plus
    dpo.nllWeight x the chosen answers' per-token NLL (RPO) when set."""

    name = "dpo"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.beta = trainer.spec.dpo.beta
        self.nll_weight = trainer.spec.dpo.nll_weight
        self.mtp_weight = mtp_loss_weight(trainer, trainer.spec.dpo.mtp)
        self.reference = self.tr.frozen_reference(trainer.plan.reference_uri)
        if is_raw(self.dataset):
            from flashops.trainers.loader import RawRowsLoader

            self.loader = RawRowsLoader(self.dataset, self.batch_size, trainer.dist.rank, trainer.dist.world_size)

    def encode_pair(self, ex: dict):
        prompt = ex["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        thinking = bool(ex.get("thinking", False))
        return [self.codec.chat(messages + response_messages(ex[side], side), thinking)
                for side in ("chosen", "rejected")]

    def batch(self):
        width = self.seq_len + 1
        chosen, rejected = [], []
        # raw rows: this rank's rows only (one row stream each); builtin: the global batch
        examples = (self.loader.next_rows() if self.loader is not None
                    else [self.next_example() for _ in range(self.batch_size)])
        for ex in examples:
            c, r = self.encode_pair(ex)
            chosen.append(c)
            rejected.append(r)

        def tensors(pairs):
            return _to_tensor([p[0] for p in pairs], width, self.codec.pad), _to_tensor([p[1] for p in pairs], width, 0)

        return tensors(chosen), tensors(rejected)

    def train_step(self, step: int) -> dict:
        (ct, cm), (rt, rm) = self.batch()
        totals: dict[str, float] = {}
        n = self.batch_size
        rank, world = self.tr.dist.rank, self.tr.dist.world_size
        if self.loader is None:  # every rank built the global batch: take this rank's rows
            ct, cm, rt, rm = (t[rank::world] for t in (ct, cm, rt, rm))
        # only this rank's rows go to its device, and the reference scores only those
        ct, cm, rt, rm = (t.to(self.tr.device) for t in (ct, cm, rt, rm))
        with torch.no_grad():
            ref_c = sequence_logprob(self.reference, ct, cm)
            ref_r = sequence_logprob(self.reference, rt, rm)
        # the MTP loss (dpo.mtp) on the chosen answers' tokens, per token over all ranks' chosen tokens
        n_mtp = global_counts(self.tr, cm[:, 2:].sum())[0] if self.mtp_weight > 0 else 1
        # each pair weighs 1/global pairs; FSDP sums the ranks' gradients
        for sl in split_micro(ct.shape[0], self.micro):
            lp_c, out_c = policy_forward(self.tr.model, ct[sl], mtp=self.mtp_weight > 0)
            pc = (lp_c * cm[sl][:, 1:].to(lp_c.dtype)).sum(-1)
            pr = sequence_logprob(self.tr.model, rt[sl], rm[sl])
            loss, stats = dpo_loss(pc, pr, ref_c[sl], ref_r[sl], self.beta, self.nll_weight,
                                   cm[sl][:, 1:].sum(-1))
            frac = pc.shape[0] / n
            step_loss = loss * frac
            if self.mtp_weight > 0:  # dpo.mtp: the MTP layer learns the chosen answers
                mtp_sum = mtp_loss_sum(out_c, ct[sl], cm[sl][:, 1:])
                step_loss = step_loss + self.mtp_weight * mtp_sum / n_mtp
                totals["mtp_loss"] = totals.get("mtp_loss", 0.0) + float(mtp_sum.detach()) / float(n_mtp)
            self.tr.backward(step_loss)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * frac
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) * frac
        out = self.tr.optimizer_step()
        local = int(ct.numel() + rt.numel())
        out.update({k: self.tr.all_sum(v) for k, v in totals.items()},
                   tokens=int(self.tr.all_sum(local)) if self.loader is not None else local * world)
        return out


def supervised_stages() -> dict[str, type[Stage]]:
    return {"pretrain": PretrainStage, "sft": SFTStage, "dpo": DPOStage}
