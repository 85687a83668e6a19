"""The supervised stages: pretrain (next token + MTP), sft (assistant tokens only, best-fit packing) and
dpo (frozen reference, sigmoid loss). rl lives in rl.py. A stage turns step s into micro-batches and
losses; the engine does the rest.

Data position: each stage keeps a cursor (the index of the next example) that advances as examples are
packed; it is saved in every checkpoint, so a resumed run sees exactly the examples it would have seen.
Losses are normalised by the whole batch's token (or pair) count, so gradient accumulation over
micro-batches gives the same update as one big batch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from flashops.model.tokenizer import BOS, EOS, PAD, chat_segments, load_tokenizer
from flashops.trainers.losses import dpo_loss, masked_ce, token_logprobs

IGNORE = 0  # mask value


@dataclass
class Packed:
    tokens: torch.Tensor     # (B, L+1) token ids
    positions: torch.Tensor  # (B, L+1) position within its document (restarts at 0)
    mask: torch.Tensor       # (B, L+1) 1 where the token is a training target


class Codec:
    """Tokenizer + the id conventions the stages use."""

    def __init__(self):
        self.tok = load_tokenizer()
        self.bos, self.eos, self.pad = (self.tok.token_to_id(t) for t in (BOS, EOS, PAD))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def chat(self, messages, thinking: bool) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a rendered conversation: mask 1 on what the assistant writes."""
        ids, mask = [], []
        for text, is_out in chat_segments(messages, thinking, add_generation_prompt=False):
            piece = self.encode(text)
            ids += piece
            mask += [int(is_out)] * len(piece)
        return ids, mask

    def prompt(self, messages, thinking: bool = False) -> list[int]:
        return self.encode("".join(t for t, _ in chat_segments(messages, thinking, add_generation_prompt=True)))


def split_micro(batch_size: int, micro: int) -> list[slice]:
    return [slice(i, i + micro) for i in range(0, batch_size, micro)]


def _to_tensor(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Stage:
    name = "stage"

    def __init__(self, trainer):
        self.tr = trainer
        self.codec = Codec()
        self.cursor = 0
        spec = trainer.spec
        self.seq_len = spec.training.seq_len
        self.batch_size = spec.training.batch_size
        self.micro = trainer.plan.micro_batch_size
        self.dataset = trainer.plan.dataset

    def state_dict(self) -> dict:
        return {"cursor": torch.tensor(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])

    def on_start(self) -> None:
        pass

    def on_end(self) -> dict:
        return {}

    def next_example(self) -> dict:
        ex = self.dataset[self.cursor]
        self.cursor += 1
        return ex


# ------------------------------------------------------------------------------------------ pretrain


class PretrainStage(Stage):
    """Documents <bos> text <eos> packed back to back into rows of seqLen + 1 tokens (positions restart per
    document, so attention stays within it); next-token loss + mtpWeight x MTP loss from mtpFromStep."""

    name = "pretrain"

    def pack(self) -> Packed:
        width = self.seq_len + 1
        rows, pos, masks = [], [], []
        for _ in range(self.batch_size):
            ids, p = [], []
            while len(ids) < width:
                doc = [self.codec.bos] + self.codec.encode(self.next_example()["text"]) + [self.codec.eos]
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
        batch = self.pack()
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
    inp, tgt, pos, mask, mtp_mask = (t[rank::world] for t in (inp, tgt, pos, mask, mtp_mask))
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
    stats.update(loss=tr.all_sum(total_ce), tokens=int(inp.numel()) * world)
    if mtp_weight > 0:
        stats["mtp_loss"] = tr.all_sum(total_mtp)
    return stats


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
        batch = self.pack()
        return supervised_step(self.tr, batch, mtp_weight=0.1 if self.tr.model.mtp is not None else 0.0)


# ------------------------------------------------------------------------------------------ dpo


def sequence_logprob(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over masked target positions: tokens (B, L+1), mask (B, L+1) on targets."""
    out = model(tokens[:, :-1], mtp=False)
    lp = token_logprobs(out.logits, tokens[:, 1:])
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class DPOStage(Stage):
    """Pairs (prompt, chosen, rejected) in non-thinking chat form; the reference is a frozen copy of the
    starting policy (or dpo.reference); loss -log sigmoid(beta x (policy - reference) margin)."""

    name = "dpo"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.beta = trainer.spec.dpo.beta
        self.reference = frozen_copy(trainer.model)
        plan = trainer.plan
        if plan.reference_uri and plan.reference_uri != plan.init_uri:
            trainer.load_weights(self.reference, plan.reference_uri)

    def encode_pair(self, ex: dict):
        prompt = ex["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        out = []
        for answer in (ex["chosen"], ex["rejected"]):
            out.append(self.codec.chat(messages + [{"role": "assistant", "content": str(answer)}], thinking=False))
        return out

    def batch(self):
        width = self.seq_len + 1
        chosen, rejected = [], []
        for _ in range(self.batch_size):
            c, r = self.encode_pair(self.next_example())
            chosen.append(c)
            rejected.append(r)

        def tensors(pairs):
            return (_to_tensor([p[0] for p in pairs], width, self.codec.pad),
                    _to_tensor([p[1] for p in pairs], width, 0))

        return tensors(chosen), tensors(rejected)

    def train_step(self, step: int) -> dict:
        (ct, cm), (rt, rm) = self.batch()
        with torch.no_grad():
            ref_c = sequence_logprob(self.reference, ct, cm)
            ref_r = sequence_logprob(self.reference, rt, rm)
        totals: dict[str, float] = {}
        n = ct.shape[0]
        rank, world = self.tr.dist.rank, self.tr.dist.world_size
        ct, cm, rt, rm, ref_c, ref_r = (t[rank::world] for t in (ct, cm, rt, rm, ref_c, ref_r))
        # each pair weighs 1/global pairs; FSDP sums the ranks' gradients
        for sl in split_micro(ct.shape[0], self.micro):
            pc = sequence_logprob(self.tr.model, ct[sl], cm[sl])
            pr = sequence_logprob(self.tr.model, rt[sl], rm[sl])
            loss, stats = dpo_loss(pc, pr, ref_c[sl], ref_r[sl], self.beta)
            frac = pc.shape[0] / n
            self.tr.backward(loss * frac)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * frac
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) * frac
        out = self.tr.optimizer_step()
        out.update({k: self.tr.all_sum(v) for k, v in totals.items()},
                   tokens=int(ct.numel() + rt.numel()) * world)
        return out


def make_stage(trainer) -> Stage:
    stage = trainer.spec.stage
    if stage == "pretrain":
        return PretrainStage(trainer)
    if stage == "sft":
        return SFTStage(trainer)
    if stage == "dpo":
        return DPOStage(trainer)
    from flashops.trainers.rl import RLStage

    return RLStage(trainer)
