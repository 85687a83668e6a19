"""Will a training run fit on its GPUs? Per-rank memory from the architecture and the parallel layout, with
no torch, so `flashops validate` and the operator (which imports no torch) can refuse a run before any pod
is scheduled. `flashops plan` computes the same figures by building the model on the meta device and
applying the real FSDP2 + EP parallelization on a fake process group (flashops.trainers.plan), and a test
checks that both agree and that a real 2-process run measures them.

    from flashops.api.plan import memory_per_rank, verdict, parse_bytes
    mem = memory_per_rank(cfg, world_size=64, ep=8, micro_batch=1, seq_len=4096)   # cfg: a JoyAIConfig
    plan = verdict("pretrain-48b", mem, world_size=64, ep=8, gpu_memory=parse_bytes("80GiB"))
    plan.fits, plan.fix

How the bytes are counted (per rank, rank 0: FSDP2 gives it the ceil of every uneven split):
- params, grads: fp32 (master weights stay fp32; bf16 is only the compute dtype). FSDP2 shards every tensor's
  dim 0 over the data-parallel ranks; routed experts are first split over `ep` ranks, then sharded over
  the remaining world / ep ranks (dim 0, or dim 1 when that degree x ep exceeds the expert count,
  as torchtitan does).
- optimizer: AdamW keeps two fp32 moments (8 B/param); Muon one momentum (4 B) for the 2-D hidden matrices.
  So AdamW: 16 B/param / shard degree for weights + grads + moments.
- activations: what autograd saves for backward in one micro-batch (micro_batch x seq_len tokens on this
  rank), per layer from the tensors each op keeps, in the compute dtype, with fp32 where the model keeps
  fp32 (residual stream, router scores, the loss's softmax). Activation checkpointing "full" keeps only each
  block's input plus one block recomputed at a time; "selective" (torchtitan's op-level SAC) keeps matmul
  outputs but recomputes the rest (about half).
- fits: total <= (1 - HEADROOM) x GPU memory; the headroom covers the CUDA context, the allocator's
  fragmentation and the gathered (unsharded) parameters of the layers in flight.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

HEADROOM = 0.10
ActivationCheckpointing = Literal["none", "selective", "full"]
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
          "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_bytes(text: str | int) -> int:
    """'80GiB', '80Gi' (Kubernetes), '141GB', '80 GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size: write e.g. 80GiB, 80Gi or 141GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


# ---- the architecture's tensors (names as in JoyAIFlash.named_parameters()) -------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    routed_expert: bool = False  # split over ep, then sharded over world / ep
    muon: bool = False  # a 2-D hidden matrix (Muon's when optimizer.name is muon)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameter_tensors(cfg: Any) -> list[Tensor]:
    """Every parameter of the model for `cfg` (a JoyAIConfig or anything with its fields)."""
    d, h = cfg.dim, cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    out: list[Tensor] = [Tensor("tok_embeddings.weight", (cfg.vocab_size, d))]

    def mat(name, rows, cols):
        out.append(Tensor(name, (rows, cols), muon=True))

    def vec(name, n):
        out.append(Tensor(name, (n,)))

    def attention(p):
        if cfg.q_lora_rank:
            mat(f"{p}.wq_a.weight", cfg.q_lora_rank, d)
            vec(f"{p}.q_norm.weight", cfg.q_lora_rank)
            mat(f"{p}.wq_b.weight", h * qk, cfg.q_lora_rank)
        else:
            mat(f"{p}.wq.weight", h * qk, d)
        mat(f"{p}.wkv_a.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
        vec(f"{p}.kv_norm.weight", cfg.kv_lora_rank)
        mat(f"{p}.wkv_b.weight", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        mat(f"{p}.wo.weight", d, h * cfg.v_head_dim)

    def ffn(p, hidden):
        mat(f"{p}.w1.weight", hidden, d)
        mat(f"{p}.w2.weight", d, hidden)
        mat(f"{p}.w3.weight", hidden, d)

    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        attention(f"{p}.attention")
        vec(f"{p}.attention_norm.weight", d)
        vec(f"{p}.ffn_norm.weight", d)
        if i < cfg.n_dense_layers:
            ffn(f"{p}.feed_forward", cfg.dense_hidden_dim)
            continue
        mat(f"{p}.moe.router.gate.weight", cfg.num_experts, d)
        e, f = cfg.num_experts, cfg.moe_hidden_dim
        for name, shape in (("w1_EFD", (e, f, d)), ("w2_EDF", (e, d, f)), ("w3_EFD", (e, f, d))):
            out.append(Tensor(f"{p}.moe.routed_experts.inner_experts.{name}", shape, routed_expert=True))
        if cfg.num_shared_experts:
            ffn(f"{p}.moe.shared_experts", f * cfg.num_shared_experts)
    vec("norm.weight", d)
    out.append(Tensor("lm_head.weight", (cfg.vocab_size, d)))
    for j in range(cfg.num_mtp_layers):
        p = f"mtp_layers.{j}"
        attention(f"{p}.attention")
        ffn(f"{p}.feed_forward", cfg.dense_hidden_dim)
        for norm in ("attention_norm", "ffn_norm", "enorm", "hnorm", "mtp_norm"):
            vec(f"{p}.{norm}.weight", d)
        mat(f"{p}.eh_proj.weight", d, 2 * d)
    return out


def local_numel(t: Tensor, world_size: int, ep: int, num_experts: int) -> int:
    """Elements of `t` on rank 0 after EP + FSDP2 sharding (torch.chunk sizes: the ceil goes to rank 0)."""
    shape = list(t.shape)
    if world_size == 1:
        return t.numel
    if t.routed_expert:
        shard = world_size // ep
        shape[0] //= ep
        dim = 1 if world_size > num_experts else 0  # torchtitan: Shard(1) when efsdp x ep > experts
    else:
        shard, dim = world_size, 0
    shape[dim] = -(-shape[dim] // shard)
    return math.prod(shape)


# ---- activations ------------------------------------------------------------------------------------


def activation_bytes(cfg: Any, tokens: int, *, compute_bytes: int = 2, checkpointing: str = "none",
                     mtp: bool = True, seq_len: int | None = None, attention_kernel: str = "flash") -> int:
    """Bytes autograd keeps for backward for `tokens` tokens (micro-batch x seq_len) on one rank, counted op
    by op as torch saves them: an RMSNorm keeps its input, the fp32 reciprocal RMS and the normalised tensor,
    and the next projection keeps the norm's output; attention keeps q, k, v and its output + log-sum-exp
    (flash/flex, GPUs; attention_kernel="math", CPU's unfused kernel, keeps the L x S probabilities
    instead); the CPU's RMSNorm keeps an fp32 copy of a bf16 input (GPU kernels may keep less); SwiGLU keeps w1, w3, silu and product; the router keeps fp32 scores and the chosen ids; the
    loss keeps the fp32 log-softmax over the vocabulary."""
    c, f32, i64 = compute_bytes, 4, 8
    d, h = cfg.dim, cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim

    def norm(width):  # input, its fp32 upcast (when compute is not fp32), fp32 x * rstd, rstd; the output
        return 2 * c * width + (f32 * width if c != f32 else 0) + f32 * width + f32

    def attention():
        q = norm(cfg.q_lora_rank) if cfg.q_lora_rank else 0
        kv = c * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + f32 + 2 * c * cfg.kv_lora_rank
        qkv = c * 2 * h * qk + c * h * cfg.v_head_dim
        if attention_kernel == "math":
            core = c * h * (seq_len or 1)
        else:
            core = c * h * cfg.v_head_dim + f32 * h
        return norm(d) + q + kv + f32 * cfg.qk_rope_head_dim + qkv + core + c * h * cfg.v_head_dim

    def dense_ffn(width):
        return norm(d) + c * 4 * width

    def moe():
        k, fm, e = cfg.top_k, cfg.moe_hidden_dim, cfg.num_experts
        router = f32 * d + f32 * e + i64 * k + f32 + f32 * k  # fp32 input and scores, ids, normaliser, weights
        dispatch = 3 * i64 * k + f32 * k + f32 * k * d  # sorted ids, token index, scores x fp32 expert rows
        routed = k * (c * d + c * 4 * fm)  # gathered rows, then SwiGLU per routed row
        shared = c * 4 * fm * cfg.num_shared_experts
        return norm(d) + router + dispatch + routed + shared

    dense_layer, moe_layer = attention() + dense_ffn(cfg.dense_hidden_dim), attention() + moe()
    layers = [dense_layer] * cfg.n_dense_layers + [moe_layer] * (cfg.n_layers - cfg.n_dense_layers)
    head = norm(d) + f32 * cfg.vocab_size + i64
    extra = i64  # token ids
    if mtp and cfg.num_mtp_layers:  # next-token embeddings, enorm + hnorm, eh_proj input, the block, its head
        extra += c * d + 2 * norm(d) + c * 2 * d + dense_layer + head
    if checkpointing == "full":  # block inputs kept; one block's activations rebuilt at a time in backward
        per_token = c * d * len(layers) + max(layers) + head + extra
    elif checkpointing == "selective":  # torchtitan's op SAC: matmul outputs kept, the rest recomputed
        per_token = sum(layers) // 2 + head + extra
    else:
        per_token = sum(layers) + head + extra
    return int(per_token * tokens)


# ---- per-rank memory and verdict ------------------------------------------------------------------


@dataclass
class RankMemory:
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def memory_per_rank(cfg: Any, *, world_size: int, ep: int = 1, micro_batch: int = 1, seq_len: int = 4096,
                    activation_checkpointing: str = "none", optimizer: str = "adamw", compute_bytes: int = 2,
                    mtp: bool = True, attention_kernel: str = "flash") -> RankMemory:
    params = adam = muon = 0
    for t in parameter_tensors(cfg):
        n = local_numel(t, world_size, ep, cfg.num_experts)
        params += n
        if optimizer == "muon" and t.muon and not t.name.startswith(("tok_embeddings", "lm_head")):
            muon += n
        else:
            adam += n
    acts = activation_bytes(cfg, micro_batch * seq_len, compute_bytes=compute_bytes, seq_len=seq_len,
                            checkpointing=activation_checkpointing, mtp=mtp, attention_kernel=attention_kernel)
    return RankMemory(params * 4, params * 4, adam * 8 + muon * 4, acts)


@dataclass
class RunPlan:
    name: str
    world_size: int
    ep: int
    micro_batch: int
    seq_len: int
    activation_checkpointing: str
    per_rank: RankMemory
    gpu_memory: int | None
    fits: bool | None
    fix: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "world_size": self.world_size, "ep": self.ep, "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "activation_checkpointing": self.activation_checkpointing,
                "per_rank_bytes": self.per_rank.to_dict(), "gpu_memory_bytes": self.gpu_memory,
                "fits": self.fits, "fix": self.fix}

    def summary(self) -> str:
        m = self.per_rank
        head = (f"{self.name}: {self.world_size} ranks (ep {self.ep}), per rank params {human_bytes(m.params)}, "
                f"grads {human_bytes(m.grads)}, optimizer {human_bytes(m.optimizer)}, activations "
                f"{human_bytes(m.activations)} (micro-batch {self.micro_batch} x {self.seq_len}, AC "
                f"{self.activation_checkpointing}), total {human_bytes(m.total)}")
        if self.gpu_memory is None:
            return head
        verdict = "fits" if self.fits else "does NOT fit"
        tail = f" of {human_bytes(self.gpu_memory)}: {verdict}"
        return head + tail + (f". Fix: {self.fix}" if self.fix else "")


def usable(gpu_memory: int) -> int:
    return int(gpu_memory * (1 - HEADROOM))


def verdict(name: str, memory: RankMemory, *, world_size: int, ep: int, gpu_memory: int | None,
            micro_batch: int = 1, seq_len: int = 4096, activation_checkpointing: str = "none",
            replan=None) -> RunPlan:
    """RunPlan with fits and, when it does not fit, the first fix that does: more ranks (whole nodes of
    the same size), a larger ep, activation checkpointing, a smaller micro-batch. `replan(**changes)` gives
    the RankMemory for a changed layout (memory_per_rank with the run's other arguments)."""
    plan = RunPlan(name, world_size, ep, micro_batch, seq_len, activation_checkpointing, memory, gpu_memory, None)
    if gpu_memory is None:
        return plan
    budget = usable(gpu_memory)
    plan.fits = memory.total <= budget
    if plan.fits or replan is None:
        return plan
    fixes = []
    for world in (world_size * 2 ** i for i in range(1, 8)):
        if replan(world_size=world).total <= budget:
            fixes.append(f"use {world} GPUs (nodes x procsPerNode; now {world_size})")
            break
    for new_ep in (ep * 2 ** i for i in range(1, 8)):
        if new_ep > world_size:
            break
        if replan(ep=new_ep).total <= budget:
            fixes.append(f"set parallelism.ep: {new_ep} (now {ep})")
            break
    for ac in ("selective", "full"):
        if ac != activation_checkpointing and replan(activation_checkpointing=ac).total <= budget:
            fixes.append(f"set training.activationCheckpointing: {ac}")
            break
    if micro_batch > 1:
        for mb in range(micro_batch - 1, 0, -1):
            if replan(micro_batch=mb).total <= budget:
                fixes.append(f"set training.microBatchSize: {mb} (now {micro_batch})")
                break
    over = human_bytes(memory.total - budget)
    plan.fix = ("; or ".join(fixes) if fixes else "no single change fits: combine more GPUs with activation "
                "checkpointing and a smaller micro-batch") + f" ({over} over the {int(HEADROOM * 100)}% headroom budget)"
    return plan


# ---- a run spec's plan ------------------------------------------------------------------------------


def layout(spec: Any, gpus: int | None = None) -> dict:
    """What a plan depends on, from a run spec (RunSpecBase): world size (`gpus` overrides nodes x
    procsPerNode), ep, one micro-batch's rows on one rank, seq_len, activation checkpointing, optimizer,
    compute dtype (auto: bf16, as on the GPUs a plan is for), whether the MTP layer runs."""
    world = gpus or spec.parallelism.world_size
    ep = spec.parallelism.ep
    if world % ep:
        raise ValueError(f"{world} GPUs: spec.parallelism.ep = {ep} must divide the world size; "
                         f"use a multiple of {ep} GPUs or another ep")
    tr = spec.training
    rows_per_rank = -(-tr.batch_size // world)  # each rank trains on its share of the global batch's rows
    micro = min(tr.micro_batch_size or tr.batch_size, rows_per_rank)
    mtp = spec.stage in ("pretrain", "sft") and (spec.stage != "pretrain" or spec.pretrain.mtp_weight > 0)
    return {"world_size": world, "ep": ep, "micro_batch": micro, "seq_len": tr.seq_len,
            "activation_checkpointing": tr.activation_checkpointing, "optimizer": spec.optimizer.name,
            "compute_bytes": 4 if tr.dtype == "float32" else 2, "mtp": mtp}


def plan_run(name: str, spec: Any, cfg: Any, gpus: int | None = None, gpu_memory: int | None = None) -> RunPlan:
    """The torch-free plan of one run: `cfg` is its model config (a JoyAIConfig); gpu_memory in bytes
    (default: spec.resources.gpuMemory, None: no verdict)."""
    lay = layout(spec, gpus)
    if gpu_memory is None and spec.resources.gpu_memory:
        gpu_memory = parse_bytes(spec.resources.gpu_memory)
    mem = memory_per_rank(cfg, **lay)

    def replan(**changes):
        return memory_per_rank(cfg, **{**lay, **changes})

    return verdict(name, mem, world_size=lay["world_size"], ep=lay["ep"], gpu_memory=gpu_memory,
                   micro_batch=lay["micro_batch"], seq_len=lay["seq_len"],
                   activation_checkpointing=lay["activation_checkpointing"], replan=replan)


def fit_problem(name: str, spec: Any) -> str | None:
    """None when the run fits (or its spec names no resources.gpuMemory); else what does not fit, the numbers
    and the fix. Torch-free: `flashops validate` and the operator's admission call it."""
    if not spec.resources.gpu_memory:
        return None
    from flashops.api.architecture import get_config

    plan = plan_run(name, spec, get_config(spec.model.preset, spec.model.overrides))
    return None if plan.fits else f"resources.gpuMemory {spec.resources.gpu_memory}: does not fit: {plan.summary()}"
