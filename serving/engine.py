"""The generation engine: continuous batching over a fixed set of KV-cache slots, with optional MTP
speculative decoding.

One asyncio task owns the model. Each iteration it admits waiting requests (prefill, one forward
each), then advances every running sequence together: one batched forward of the main model per
step (plain decoding: one token per sequence; speculative: the MTP layer drafts k tokens per
sequence, the main model verifies all k+1 positions in one batched pass). The forward passes run in
a single worker thread so the event loop keeps serving HTTP. Sequences leave the batch when they hit
EOS, a stop string, max_tokens, the context length, or when their client goes away.

    engine = Engine(backend, detokenize=tok.decode, eos_id=1, mtp_tokens=3, metrics=ModelMetrics("m"))
    async for chunk in engine.generate(prompt_ids, SamplingParams(temperature=0)):
        print(chunk.text, end="")

Cache bookkeeping per sequence: positions [0, pos) of the main cache hold the context; `pending`
(the newest token) sits at position pos and is not cached yet. `mtp_hidden`/`mtp_tokens` are the
(h_i, t_{i+1}) pairs the MTP layer has not seen yet (hidden kept as [n, D] chunks, straight from the
forward pass that made them); drafting feeds them first, then recurses.

Per speculative step the model runs k MTP calls and one main call: the first MTP call both catches up
on the pairs the last verification produced and drafts d_1 (the verify pass's hidden states are what it
needs, so nothing is recomputed), then d_2..d_k recurse on the MTP layer's own hidden state. Greedy
drafts stay on the tensor side between calls; each step reads tokens back to Python once per phase
(drafts, verdicts), not once per token.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol, TypeVar

import torch

from flashops.serving.metrics import ModelMetrics
from flashops.model.sampling import sample, token_probs
from flashops.serving.sampling import SamplingParams
from flashops.serving.speculative import accept_greedy_targets, accept_sampling


T = TypeVar("T")


class Backend(Protocol):
    """What the engine needs from a model; serving/backend.py implements it for JoyAIFlash."""

    vocab_size: int
    max_len: int  # tokens one cache slot holds (the served context length)
    slots: int  # sequences decoded at once
    has_mtp: bool

    def forward(self, slots: list[int], tokens: torch.Tensor, starts: list[int],
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model on tokens [B, T] placed at positions starts[b].. of each slot's cache (written).
        Returns logits [B, T, V] and final hidden states [B, T, D] (the MTP layer's input).
        With logits_at [B] (a position per row) the logits are [B, 1, V] at those positions only."""
        ...

    def mtp(self, slots: list[int], hidden: torch.Tensor, tokens: torch.Tensor, starts: list[int],
            logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer on pairs (hidden[b, t], tokens[b, t]) at positions starts[b]+t (its own cache).
        Returns logits [B, T, V] for the token after next and its hidden [B, T, D] for recursion;
        logits_at as in forward."""
        ...


@dataclass
class Chunk:
    text: str  # new text, safe to show (never part of a stop string)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" on the last chunk


class EngineError(RuntimeError):
    """The model failed on a step; only the sequences in that step are affected."""


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    queue: asyncio.Queue
    arrived: float
    slot: int = -1
    pos: int = 0
    pending: int = -1
    generated: list[int] = field(default_factory=list)
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # [n_i, D] chunks
    mtp_tokens: list[int] = field(default_factory=list)
    text_sent: int = 0
    finished: str | None = None
    cancelled: bool = False
    first_token_at: float | None = None


class Engine:
    def __init__(self, backend: Backend, detokenize: Callable[[list[int]], str], eos_id: int | None,
                 mtp_tokens: int, metrics: ModelMetrics):
        if mtp_tokens and not backend.has_mtp:
            raise ValueError(f"mtp_tokens={mtp_tokens} but the model has no MTP layer: "
                             "serve it with speculative.mtpTokens: 0, or export a model trained with MTP")
        if not 0 <= mtp_tokens <= 3:
            raise ValueError(f"mtp_tokens={mtp_tokens}: use 0 (off) to 3")
        self.backend, self.detokenize, self.eos_id = backend, detokenize, eos_id
        self.mtp_tokens, self.metrics = mtp_tokens, metrics
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._free_slots = list(range(backend.slots))
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashops-engine")

    # ------------------------------------------------------------------ public
    @property
    def max_len(self) -> int:
        return self.backend.max_len

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream chunks for one request. Closing the iterator early (client gone) frees its slot."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context holds {self.max_len}")
        self._ensure_loop()
        seq = _Sequence(prompt=list(prompt), params=params, generator=params.generator(),
                        queue=asyncio.Queue(), arrived=time.perf_counter())
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if seq.finished is None:
                seq.cancelled = True  # the loop drops it at the next step boundary
                if seq in self._waiting:
                    self._waiting.remove(seq)

    async def run_in_model_thread(self, fn: Callable[[], T]) -> T:
        """Run other model work (scoring logprobs) on the engine's one model thread, between its steps,
        so it never races a decoding step on the same weights and buffers."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the loop
    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            # a new event loop (another asyncio.run, another test): the old one's task and waiters are gone
            self._task, self._wake = None, asyncio.Event()
            self._running, self._waiting = [], []
            self._free_slots = list(range(self.backend.slots))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name="flashops-engine")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = [s for s in self._running if not self._release_if_done(s)]
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted = []
            while self._waiting and self._free_slots:
                seq = self._waiting.pop(0)
                seq.slot = self._free_slots.pop()
                admitted.append(seq)
            batch = [s for s in self._running if not s.cancelled]
            started = time.perf_counter()
            try:
                emitted = await loop.run_in_executor(self._executor, self._step, admitted, batch)
            except Exception as e:  # a failed step fails its sequences, never the server
                for s in admitted + batch:
                    s.finished = "error"
                    s.queue.put_nowait(EngineError(f"generation failed: {type(e).__name__}: {e}"))
                self._running = [s for s in self._running + admitted if not self._release_if_done(s)]
                continue
            elapsed = time.perf_counter() - started
            self._running.extend(admitted)
            self.metrics.throughput(sum(len(t) for t in emitted.values()), elapsed)
            for seq, tokens in emitted.items():
                self._deliver(seq, tokens)

    def _release_if_done(self, seq: _Sequence) -> bool:
        if seq.finished is None and not seq.cancelled:
            return False
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1
        return True

    # ------------------------------------------------------------------ model work (worker thread)
    @torch.inference_mode()
    def _step(self, admitted: list[_Sequence], batch: list[_Sequence]) -> dict[_Sequence, list[int]]:
        emitted: dict[_Sequence, list[int]] = {}
        for seq in admitted:
            emitted[seq] = self._prefill(seq)
        if batch:
            room = min(self.max_len - 1 - s.pos for s in batch)
            k = min(self.mtp_tokens, room)
            emitted.update(self._speculative_step(batch, k) if k > 0 else self._plain_step(batch))
        return emitted

    def _prefill(self, seq: _Sequence) -> list[int]:
        last = torch.tensor([len(seq.prompt) - 1])
        logits, hidden = self.backend.forward([seq.slot], torch.tensor([seq.prompt]), [0], logits_at=last)
        token = self._choose(seq, logits[0, 0])
        seq.pos, seq.pending = len(seq.prompt), token
        if self.mtp_tokens:
            seq.mtp_hidden = [hidden[0]]
            seq.mtp_tokens = seq.prompt[1:] + [token]
        return [token]

    def _plain_step(self, batch: list[_Sequence]) -> dict[_Sequence, list[int]]:
        tokens = torch.tensor([[s.pending] for s in batch])
        logits, hidden = self.backend.forward([s.slot for s in batch], tokens, [s.pos for s in batch])
        out = {}
        for b, seq in enumerate(batch):
            token = self._choose(seq, logits[b, 0])
            seq.pos, seq.pending = seq.pos + 1, token
            if self.mtp_tokens:
                seq.mtp_hidden.append(hidden[b, :1])
                seq.mtp_tokens.append(token)
            out[seq] = [token]
        return out

    def _speculative_step(self, batch: list[_Sequence], k: int) -> dict[_Sequence, list[int]]:
        slots = [s.slot for s in batch]
        drafts, draft_probs = self._draft(batch, slots, k)
        verify = torch.tensor([[s.pending, *d] for s, d in zip(batch, drafts)])
        logits, hidden = self.backend.forward(slots, verify, [s.pos for s in batch])
        # one argmax and one read-back for every greedy row (instead of one per row)
        targets = logits.argmax(-1).tolist() if any(s.params.greedy for s in batch) else None
        out = {}
        for b, seq in enumerate(batch):
            if seq.params.greedy:
                verdict = accept_greedy_targets(drafts[b], targets[b])
            else:
                p = token_probs(logits[b], seq.params.temperature, seq.params.top_p)
                verdict = accept_sampling(drafts[b], draft_probs[b], p, seq.generator)
            n = verdict.accepted
            self.metrics.verification(k, n)
            seq.mtp_hidden = [hidden[b, : n + 1]]
            seq.mtp_tokens = list(verdict.tokens)
            seq.pos, seq.pending = seq.pos + n + 1, verdict.tokens[-1]
            out[seq] = verdict.tokens
        return out

    def _draft(self, batch: list[_Sequence], slots: list[int], k: int
               ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """k draft tokens per sequence from the MTP layer: first over the pairs it has not seen
        (right-padded to a common length; causal attention keeps padding out of real positions),
        then recursively on its own output."""
        lengths = [len(s.mtp_tokens) for s in batch]
        if len(batch) == 1:  # the common batch-1 case: no padding, no copies
            chunks = batch[0].mtp_hidden
            hidden = (chunks[0] if len(chunks) == 1 else torch.cat(chunks))[None]
            tokens = torch.tensor([batch[0].mtp_tokens])
        else:
            width = max(lengths)
            first = batch[0].mtp_hidden[0]
            hidden = first.new_zeros(len(batch), width, first.shape[-1])
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for b, s in enumerate(batch):
                hidden[b, : lengths[b]] = torch.cat(s.mtp_hidden)
                tokens[b, : lengths[b]] = torch.tensor(s.mtp_tokens)
        starts = [s.pos - n for s, n in zip(batch, lengths)]
        last = torch.tensor(lengths) - 1
        logits, h = self.backend.mtp(slots, hidden, tokens, starts, logits_at=last)
        logits, h = logits[:, 0], h[torch.arange(len(batch)), last]
        greedy = [s.params.greedy for s in batch]
        columns: list[torch.Tensor] = []  # draft j of every row, [B]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        for j in range(k):
            if j:
                logits, h = self.backend.mtp(slots, h[:, None], columns[-1][:, None],
                                             [s.pos + j - 1 for s in batch])
                logits, h = logits[:, 0], h[:, 0]
            column = logits.argmax(-1)  # greedy rows' drafts; sampled rows are overwritten below
            for b, seq in enumerate(batch):
                if not greedy[b]:
                    q = token_probs(logits[b], seq.params.temperature, seq.params.top_p)
                    column[b] = sample(q, seq.generator)
                    probs[b].append(q)
            columns.append(column)
        for s in batch:
            s.mtp_hidden, s.mtp_tokens = [], []
        drafts = torch.stack(columns, 1).tolist()
        return drafts, [torch.stack(p) if p else None for p in probs]

    @staticmethod
    def _choose(seq: _Sequence, logits: torch.Tensor) -> int:
        if seq.params.greedy:
            return int(logits.argmax())
        return sample(token_probs(logits, seq.params.temperature, seq.params.top_p), seq.generator)

    # ------------------------------------------------------------------ output (event loop)
    def _deliver(self, seq: _Sequence, tokens: list[int]) -> None:
        if seq.cancelled or seq.finished:
            return
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.metrics.first_token(seq.first_token_at - seq.arrived)
        finish = None
        kept = []
        for t in tokens:
            if t == self.eos_id:
                finish = "stop"
                break
            kept.append(t)
            if len(seq.generated) + len(kept) >= seq.params.max_tokens:
                finish = "length"
                break
        seq.generated.extend(kept)
        self.metrics.generated(len(kept))
        if finish is None and seq.pos >= self.max_len - 1:
            finish = "length"  # the context is full
        text, stopped = self._new_text(seq, final=finish is not None)
        if stopped:
            finish = "stop"
        if finish is not None:
            seq.finished = finish
        seq.queue.put_nowait(Chunk(text=text, token_ids=kept, finish_reason=finish))

    def _new_text(self, seq: _Sequence, final: bool) -> tuple[str, bool]:
        """Text not yet sent, cut at the first stop string; hold back what might still become one."""
        full = self.detokenize(seq.generated)
        stops = seq.params.stop
        cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = full[seq.text_sent: max(cut, seq.text_sent)]
            seq.text_sent = max(cut, seq.text_sent)
            return text, True
        end = len(full)
        if not final:
            end = len(full.rstrip("\ufffd"))  # an unfinished multi-byte character
            end -= max((n for s in stops for n in range(1, min(len(s) - 1, end) + 1)
                        if full[:end].endswith(s[:n])), default=0)
        end = max(end, seq.text_sent)
        text = full[seq.text_sent:end]
        seq.text_sent = end
        return text, False
