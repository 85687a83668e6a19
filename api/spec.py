"""The flashops job specs: TrainingRun, TrainingPipeline, ModelDeployment (group flashops.dev/v1alpha1).

These pydantic models are the single source of truth: the CRDs (`flashops crds`), the operator, the
local runner and the trainers all read specs through them. Field names are snake_case in Python and
camelCase in YAML (Kubernetes convention); both spellings are accepted on input.

    from flashops.api.spec import load_file
    objs = load_file("examples/quickstart.yaml")     # raises SpecError naming file/object/field
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

# The model presets and override names come from the one torch-free architecture module (flashops.model
# re-exports it), so the spec, the CRD, the operator and the trainer check a model block the same way.
from flashops.api.architecture import FIELDS as MODEL_FIELDS
from flashops.api.architecture import MODEL_PRESETS, OVERRIDE_NAMES

API_GROUP = "flashops.dev"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

STAGES = ("pretrain", "sft", "dpo", "rl")
RL_ALGORITHMS = ("fiberpo", "grpo", "gspo")
DATA_SCHEMES = ("builtin:", "file://", "s3://")
DEFAULT_DATA = {"pretrain": "builtin:pretrain-text", "sft": "builtin:sft-chat", "dpo": "builtin:dpo-pairs",
                "rl": "builtin:rl-tasks"}  # a stage's data when spec.data is unset (flashops.trainers.corpora makes them)
MAX_LR = 1.0
MAX_STEPS = 10_000_000  # ~10x the longest published pretraining schedules
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# --- object names (issue 17 item 3): checked up front with the strictest rule a child needs, here (validate,
# the operator) and in the CRD (the same limits as CEL rules, so `kubectl apply` refuses them too).
# Every child (PyTorchJob, TrainJob, InferenceService) needs an RFC 1035 label: a letter first, at most 63.
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RFC1035_PATTERN = RFC1035.pattern
# Longest name per kind. A ModelDeployment's InferenceService gets a Knative revision named
# `<name>-predictor-00001`, which must itself be a 63-character label: 63 - len("-predictor-00001") = 47.
# A pipeline's stage runs are `<pipeline>-<stage>`, each a TrainingRun name (checked per stage below).
NAME_MAX_LENGTH = {"TrainingRun": 63, "TrainingPipeline": 63, "ModelDeployment": 47}
NAME_WHY = {"TrainingRun": "the PyTorchJob or TrainJob it becomes",
            "TrainingPipeline": "the TrainingRuns and jobs it becomes",
            "ModelDeployment": "the InferenceService's Knative revision <name>-predictor-00001"}
MAX_STAGES = 32
LINEAGE_PREFIX = "lineage:"


def cel_rules(*rules: tuple[str, str]) -> ConfigDict:
    """A model's cross-field checks as CRD CEL rules (rule, message), next to the pydantic validator that
    makes the same decision, so `kubectl apply` refuses what `flashops validate` refuses (tests/api check both)."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]})


class Spec(BaseModel):
    """Base for every spec object: camelCase aliases, unknown fields rejected (typos fail loudly)."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=to_camel, validate_assignment=True
    )

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------- shared pieces


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata flashops reads; the rest (uid, resourceVersion...) is kept."""

    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if len(v) > 63 or not RFC1035.match(v):
            raise ValueError(
                f"'{v}' is not a valid name: use lower-case letters, digits and '-', starting with a letter "
                "and ending with a letter or digit, at most 63 characters (the Kubeflow and KServe objects it "
                f"becomes need an RFC 1035 label){_name_hint(v)}"
            )
        return v


def _dns_label(v: str) -> str:
    """A DNS-1123 label (may start with a digit): stage names, which only ever follow a pipeline's name."""
    if len(v) > 63 or not DNS1123.match(v):
        raise ValueError(
            f"'{v}' is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return v


def _name_hint(v: str) -> str:
    fixed = re.sub(r"[^a-z0-9-]+", "-", v.lower()).strip("-")
    fixed = re.sub(r"^[0-9-]+", "", fixed)[:63].rstrip("-")
    return f", e.g. '{fixed}'" if fixed and fixed != v and RFC1035.match(fixed) else ""


class ModelRef(Spec):
    """Which architecture: a preset plus overrides of flashops.api.architecture.JoyAIConfig fields, in snake_case
    or camelCase (e.g. {nLayers: 2}); checked by flashops.api.loader.check_architecture."""

    preset: str = "joyai-flash-debug"
    overrides: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="JoyAIConfig fields to change, snake_case or camelCase (nLayers: 2)",
        json_schema_extra={"maxProperties": len(MODEL_FIELDS), "x-kubernetes-validations": [{
            "rule": "self.all(k, k in " + repr(sorted(OVERRIDE_NAMES)).replace(" ", "") + ")",
            "message": "an override names a field the model config does not have; flashops validate says which "
                       "and suggests the right one"}]})

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODEL_PRESETS:
            raise ValueError(f"'{v}' is not one of {', '.join(MODEL_PRESETS)}")
        return v


class DataSpec(Spec):
    """Training data: builtin:<corpus> (generated, ships with flashops), file://... or s3://..."""

    uri: str
    format: Literal["auto", "jsonl", "parquet"] = "auto"

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(DATA_SCHEMES):
            raise ValueError(
                f"'{v}' has no supported scheme: use builtin:NAME, file:///path or s3://bucket/key"
            )
        return v


class OptimizerSpec(Spec):
    name: Literal["adamw", "muon"] = "adamw"
    # bounded (issue 17): lr 1e300 trained straight to NaN; no optimizer here is stable above 1
    lr: float = Field(3e-3, gt=0, le=MAX_LR, description=f"peak learning rate, (0, {MAX_LR:g}]; typical 1e-5..2e-2")
    min_lr: float | None = Field(None, ge=0, description="end of the decay; default lr/10")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd: share of steps spent decaying")
    grad_clip: float = Field(1.0, ge=0)


class TrainingSpec(Spec):
    """Loop sizes. global batch = batchSize sequences of seqLen tokens per optimizer step."""

    model_config = cel_rules(("!has(self.microBatchSize) || self.batchSize % self.microBatchSize == 0",
                              "batchSize must be a multiple of microBatchSize: pick a microBatchSize that divides it"))

    steps: int = Field(20, ge=1, le=MAX_STEPS, description=f"optimizer steps, 1..{MAX_STEPS:,}")
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="default: batchSize (no accumulation)")
    seq_len: int = Field(128, ge=8)
    seed: int = Field(0, description=(
        "seeds the run's randomness: model init, the builtin data and its order, RL rollout sampling and the "
        "curriculum's draws (benchmarks/rl_gain.py varies it to measure RL's spread over seeds)"))
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    log_every: int = Field(1, ge=1)
    # memory and speed switches for large runs (issue 20)
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="torchtitan's activation checkpointing per block: none, selective (op-level: keeps "
                            "matmul outputs, recomputes the rest) or full (recomputes each block in backward)")
    compile: bool = Field(False, description="torch.compile each block (GPU; ignored with a warning on CPU)")

    @model_validator(mode="after")
    def _accumulation(self) -> "TrainingSpec":
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batchSize {self.batch_size} is not a multiple of microBatchSize "
                f"{self.micro_batch_size}: pick a microBatchSize that divides it"
            )
        return self


class ParallelismSpec(Spec):
    model_config = cel_rules(
        ("(self.nodes * self.procsPerNode) % self.ep == 0",
         "ep must divide the world size (nodes x procsPerNode): pick an ep that divides it"),
        ("self.dpShard <= 0 || (self.nodes * self.procsPerNode) % self.dpShard == 0",
         "dpShard must divide the world size (nodes x procsPerNode)"),
    )
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1)
    dp_shard: int = Field(-1, ge=-1, description="-1: all ranks not used by other dimensions")
    ep: int = Field(1, ge=1, description="expert-parallel degree")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @model_validator(mode="after")
    def _divides(self) -> "ParallelismSpec":
        if self.world_size % self.ep:
            raise ValueError(
                f"ep {self.ep} does not divide the world size {self.world_size} "
                f"(nodes x procsPerNode): pick an ep that divides it"
            )
        if self.dp_shard not in (-1, 0) and self.world_size % self.dp_shard:
            raise ValueError(f"dpShard {self.dp_shard} does not divide the world size {self.world_size}")
        return self


class ResourcesSpec(Spec):
    """Per-process-group resources, as Kubernetes quantities."""

    cpu: str | None = None
    memory: str | None = None
    gpu: int = Field(0, ge=0)
    gpu_memory: str | None = Field(
        None, description="memory of one GPU, e.g. 80GiB: flashops validate and the operator then check that the "
                          "run fits per rank (see flashops plan) and refuse it with the fix when it does not")

    @field_validator("gpu_memory")
    @classmethod
    def _memory_size(cls, v: str | None) -> str | None:
        if v is not None:
            from flashops.api.plan import parse_bytes

            parse_bytes(v)  # ValueError names the value and the accepted forms
        return v


class CheckpointSpec(Spec):
    every: int = Field(10, ge=1, description="save every N steps (and at the end)")
    keep: int = Field(3, ge=1, description="keep the newest K (pinned ones are never deleted)")
    uri: str | None = Field(None, description="store root: s3://bucket/prefix or file:///dir")
    # checkpoint.mode (issue 19): how a save meets training; see docs/checkpoints.md
    mode: Literal["sync", "async"] = Field(
        "async", description="async (default): copy the state to host memory, train on while it uploads "
        "(at most one save in flight, manifest last, errors raised at the next step); sync: training waits "
        "until the checkpoint is complete (for debugging)")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("file://", "s3://")):
            raise ValueError(f"'{v}' is not a store URI: use s3://bucket/prefix or file:///dir")
        return v


class QATSpec(Spec):
    mode: Literal["off", "int4"] = "off"
    group_size: int = Field(64, ge=8)

    @field_validator("group_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of two: use 32, 64 or 128")
        return v


class S3AccessSpec(Spec):
    """How pods reach the object store. Explicit, so KServe's MinIO misconfiguration can't happen."""

    endpoint: str | None = Field(None, description="host:port or URL; default from the operator's settings")
    region: str = "us-east-1"
    secure: bool | None = Field(None, description="TLS on/off; default from the endpoint URL or settings")
    ca_bundle_secret: str | None = None
    credentials_secret: str | None = Field(None, description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")


# --------------------------------------------------------------------------- stage hyperparameters


class PretrainParams(Spec):
    mtp_weight: float = Field(0.1, ge=0, description="weight of the MTP loss once enabled (paper: 0.1)")
    mtp_from_step: int = Field(0, ge=0, description="step from which the MTP loss is on")


class MTPTrainSpec(Spec):
    """Whether a post-training stage trains the MTP layer (the speculative draft head), and how hard."""

    train: bool = Field(False, description=(
        "train the MTP layer on this stage's tokens from the same forward pass (no extra rollout): SFT on the "
        "assistant tokens, DPO on the chosen answers, RL on the policy's own rollouts. In DPO and RL its loss "
        "does not reach the trunk (the trunk's hidden states are taken as constants), so the policy moves by its "
        "own objective. Without it the MTP layer keeps what SFT taught and drifts from the final policy "
        "(acceptance collapsing after RL in other models; MiMo freezes MTP during RL). Default: on in SFT and RL "
        "(measured, docs/serving.md), off in DPO (not measured)"))
    weight: float = Field(0.1, ge=0, le=10, description=(
        "weight of the MTP loss (per-token cross-entropy) next to the stage's own loss; 0.1: the JoyAI-LLM Flash "
        "and DeepSeek-V3 MTP weight"))


class SFTMTPTrainSpec(MTPTrainSpec):
    """SFT trains the MTP layer by default, as pretraining does (the JoyAI-LLM Flash recipe)."""

    train: bool = Field(True, description=(
        "train the MTP layer on the assistant tokens, the loss reaching the trunk as in pretraining; false: the "
        "MTP layer keeps what pretraining taught"))


class RLMTPTrainSpec(MTPTrainSpec):
    """RL trains the MTP layer by default: measured on the quickstart (benchmarks/mtp_payoff.py, 3 RL seeds), it
    raised the acceptance length at k=3 from 2.73 [2.61..2.73] to 3.02 [2.94..3.14] and held-out accuracy did not
    fall (docs/serving.md)."""

    train: bool = Field(True, description=(
        "train the MTP layer on the policy's own rollouts, its loss not reaching the trunk; false: the MTP layer "
        "keeps what SFT (or DPO) left, and drafts drift from the RL policy (acceptance at k=3 2.73 against 3.02 "
        "with it, docs/serving.md)"))


class SFTParams(Spec):
    mtp: SFTMTPTrainSpec = Field(default_factory=SFTMTPTrainSpec, description=(
        "train the MTP layer on the assistant tokens with the next-token loss (on by default, as in pretraining)"))
    thinking_ratio: float = Field(0.5, ge=0, le=1, description="share of conversations in thinking mode")
    packing: Literal["best-fit", "none"] = "best-fit"


class DPOParams(Spec):
    beta: float = Field(0.1, gt=0, description=(
        "DPO's beta: how strongly the policy is held to the reference (0.1: the DPO paper's usual setting)"))
    reference: str | None = Field(None, description="reference policy; default: the initFrom checkpoint")
    nll_weight: float = Field(0.0, ge=0, description=(
        "weight of the chosen responses' per-token NLL added to the DPO loss, as RPO does (arXiv 2404.19733: "
        "1.0): it keeps DPO from lowering the chosen answers with the rejected ones, which on near-identical "
        "pairs costs what SFT taught (docs/evaluation.md). 0: plain DPO"))
    mtp: MTPTrainSpec = Field(default_factory=MTPTrainSpec, description=(
        "train the MTP layer on the chosen answers (off by default)"))
    thinking_ratio: float = Field(0.0, ge=0, le=1, description=(
        "share of the builtin pairs (builtin:dpo-pairs) posed in thinking mode: chosen and rejected carry the "
        "same worked reasoning and differ in the answer, as sft.thinkingRatio does for SFT. 0 (the default): "
        "non-thinking pairs only; 0.5 measured no better on the quickstart (thinking 0.385 after DPO against "
        "0.440, docs/evaluation.md). User rows say it per row with \"thinking\""))


# FiberPO's default split of the trajectory budget delta = C+ + C-. The FiberPO paper recommends C- < C+
# (a tighter gate on trajectories whose probability falls); 5:3 is flashops' choice within that.
FIBERPO_C_PLUS_SHARE = 0.625


class CurriculumSpec(Spec):
    """The JoyAI-LLM Flash paper's difficulty curriculum for RL prompts (trainers/curriculum.py)."""

    enabled: bool = Field(True, description=(
        "sample prompts by pass rate: target mu_t from 0.8 at the first step to 0.2 at the last, Gaussian "
        "prompt weights (width 0.15), domain groups drawn proportional to sqrt(N_g) (the paper's schedule); "
        "false: prompts uniformly at random"))
    profile: bool = Field(True, description=(
        "before the first RL step, estimate each prompt's pass rate from profileRollouts rollouts of the "
        "starting checkpoint (the paper profiles with K rollouts); false: every pass rate starts at 0.5. "
        "The profile is saved in the run's checkpoints, so a resumed run does not profile again"))
    profile_rollouts: int = Field(10, ge=1, le=1024, description=(
        "K, rollouts per prompt when profiling (the paper: K = 10); the cost is pool size x K generations"))
    profile_max_prompts: int | None = Field(None, ge=1, description=(
        "profile at most this many prompts of the pool (a fixed, seeded subset) and train on those only; "
        "default: the whole pool. Bounds the profiling cost on a large pool"))
    drop_solved: bool = Field(True, description=(
        "drop prompts the starting checkpoint already solves (all profileRollouts correct), as the paper "
        "does: they give zero group advantage and only cost rollouts. Applies only with profile: true"))
    drop_unsolved: bool = Field(False, description=(
        "also drop prompts the starting checkpoint never solves (none of profileRollouts correct): under the "
        "binary reward their groups have zero advantage too (DAPO, arXiv 2503.14476, filters such groups "
        "online), and under partialCredit they teach near misses only. Off by default: the JoyAI paper drops "
        "solved prompts only. Applies only with profile: true"))


class RLParams(Spec):
    model_config = cel_rules(
        ("!has(self.cPlus) || !has(self.cMinus) || "
         "(self.cPlus + self.cMinus - self.delta <= 1e-9 && self.delta - self.cPlus - self.cMinus <= 1e-9)",
         "cPlus + cMinus must equal delta: set both to add up to delta, or leave them out (cPlus defaults to 0.625 x delta)"),
        ("!has(self.cPlus) || self.cPlus < self.delta", "cPlus must be below delta (the other gate gets the rest)"),
        ("!has(self.cMinus) || self.cMinus < self.delta", "cMinus must be below delta (the other gate gets the rest)"),
    )
    # Every default says where it comes from. FiberPO: arXiv 2603.08239 (Fibration Policy Optimization);
    # GRPO: DeepSeekMath, arXiv 2402.03300; GSPO: arXiv 2507.18071.
    algorithm: Literal["fiberpo", "grpo", "gspo"] = Field(
        "fiberpo", description="policy loss: fiberpo (JoyAI-LLM Flash's choice), grpo or gspo (baselines)")
    eps: float = Field(0.2, gt=0, lt=1, description=(
        "FiberPO's token-level clip of the fiber residual, and GRPO's clip range 1 +- eps. 0.2: the FiberPO "
        "paper's default, and PPO's / GRPO's (DeepSeekMath) clip"))
    gspo_eps_low: float = Field(3e-4, gt=0, lt=1, description=(
        "GSPO: lower clip of the sequence ratio, 1 - gspoEpsLow. 3e-4: the GSPO paper's setting (arXiv "
        "2507.18071); a token-level 0.2 is ~500x looser and does not constrain the sequence ratio"))
    gspo_eps_high: float = Field(4e-4, gt=0, lt=1, description=(
        "GSPO: upper clip of the sequence ratio, 1 + gspoEpsHigh. 4e-4: the GSPO paper's setting"))
    delta: float = Field(0.4, gt=0, description=(
        "FiberPO's trajectory-level budget, cPlus + cMinus. 0.4: the FiberPO paper's default"))
    c_plus: float | None = Field(None, gt=0, description=(
        "FiberPO gate on the mean positive log-ratio of a trajectory. Default 0.625 x delta (0.25 at delta "
        "0.4): the FiberPO paper recommends cMinus < cPlus; the 5:3 split is flashops' choice within it"))
    c_minus: float | None = Field(None, gt=0, description=(
        "FiberPO gate on the mean negative log-ratio of a trajectory. Default delta - cPlus (0.15 at delta "
        "0.4), so cMinus < cPlus as the FiberPO paper recommends"))
    group_size: int = Field(4, ge=2, description=(
        "rollouts per prompt (the group for advantages). GRPO's paper samples 64; 4 keeps the CPU "
        "quickstart small: raise it on GPUs"))
    prompts_per_step: int = Field(4, ge=1, description="prompts per RL step (toy-scale default; raise on GPUs)")
    updates_per_batch: int = Field(2, ge=1, description=(
        "policy updates per rollout batch; > 1 makes later updates off-policy, where the losses differ"))
    max_new_tokens: int = Field(16, ge=1, description="rollout length cap (the builtin tasks' answers are short)")
    temperature: float = Field(1.0, gt=0, description="rollout sampling temperature (1.0: sample the policy itself); "
                               "the update's log-probs are of softmax(logits / temperature), the distribution the "
                               "rollouts were drawn from, as verl's actor computes them (logits.div_(temperature))")
    thinking_ratio: float = Field(0.0, ge=0, le=1, description=(
        "share of each step's prompts posed in thinking mode (the policy reasons inside <think> before it "
        "answers; the reward reads the answer after </think>), as sft.thinkingRatio does for SFT. 0: "
        "non-thinking only. RL in one mode moves the other mode's answers too (docs/evaluation.md): train both "
        "where both are served. Thinking rollouts are longer: give maxNewTokens room for the reasoning"))
    curriculum: CurriculumSpec = Field(default_factory=CurriculumSpec, description=(
        "JoyAI-LLM Flash's difficulty curriculum, as published: profile, drop solved prompts, then sample by "
        "pass rate. The old boolean form (curriculum: true / false) is read as {enabled: true / false}"))
    kl_coef: float = Field(0.0, ge=0, description="k3 KL penalty to the starting policy; 0 (off) as in DAPO / FiberPO")
    nll_weight: float = Field(0.0, ge=0, description=(
        "weight of the per-token NLL of each step's prompts' reference answers (a task's answer, with its worked "
        "reasoning in thinking mode) added to the policy loss: InstructGPT's PPO-ptx mixes a supervised loss into "
        "RL the same way (arXiv 2203.02155), and dpo.nllWeight is RPO's. It holds the policy to what SFT taught "
        "while the reward moves it. 0: the policy loss alone"))
    partial_credit: float = Field(0.0, ge=0, lt=1, description=(
        "reward for a wrong answer: partialCredit x how near it is (numbers 1 / (1 + |error|), lists and words "
        "the share of matching positions); an exact answer gets 1. 0: the binary verifiable reward of the "
        "papers. A small model that rarely answers exactly gets a gradient from near misses; accuracy, the "
        "curriculum's pass rates and the before/after table count exact answers only"))
    mtp: RLMTPTrainSpec = Field(default_factory=RLMTPTrainSpec, description=(
        "train the MTP layer on the policy's own rollouts in the update passes (on by default: measured in "
        "docs/serving.md)"))
    domains: list[str] | None = None

    @field_validator("curriculum", mode="before")
    @classmethod
    def _old_boolean_curriculum(cls, v: Any) -> Any:
        """`curriculum: true` (the form before profiling existed) means {enabled: true}."""
        return {"enabled": v} if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _band(self) -> "RLParams":
        if self.c_plus is not None and self.c_minus is not None:
            if abs(self.c_plus + self.c_minus - self.delta) > 1e-9:
                raise ValueError(
                    f"cPlus {self.c_plus} + cMinus {self.c_minus} must equal delta {self.delta}: "
                    "set both to add up to delta, or leave them out (cPlus defaults to 0.625 x delta)"
                )
        for name in ("c_plus", "c_minus"):
            value = getattr(self, name)
            if value is not None and value >= self.delta:
                raise ValueError(f"{name} {value} must be below delta {self.delta} (the other gate gets the rest)")
        return self

    @property
    def c_plus_value(self) -> float:
        if self.c_plus is not None:
            return self.c_plus
        return self.delta - self.c_minus if self.c_minus is not None else self.delta * FIBERPO_C_PLUS_SHARE

    @property
    def c_minus_value(self) -> float:
        return self.delta - self.c_plus_value

    def policy_loss_kwargs(self) -> dict:
        """The keyword arguments of this algorithm's loss (trainers.losses.POLICY_LOSSES), in one place."""
        if self.algorithm == "gspo":
            return {"eps": self.gspo_eps_low, "eps_high": self.gspo_eps_high}
        if self.algorithm == "grpo":
            return {"eps": self.eps}
        return {"eps": self.eps, "delta": self.delta, "c_plus": self.c_plus_value, "c_minus": self.c_minus_value}


# --------------------------------------------------------------------------- TrainingRun


class RunSpecBase(Spec):
    model: ModelRef = Field(default_factory=ModelRef)
    data: DataSpec | None = Field(None, description="default: the builtin corpus of the stage")
    init_from: str | None = Field(
        None, description="checkpoint URI (s3://, file://), a run name, or lineage:<id>"
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    qat: QATSpec = Field(default_factory=QATSpec)
    storage: S3AccessSpec | None = None
    runtime: Literal["pytorchjob", "trainjob"] | None = Field(
        None, description="Kubeflow runtime; default from the operator's settings"
    )
    image: str | None = None
    backoff_limit: int = Field(3, ge=0)
    suspend: bool = False

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None) -> str | None:
        if v is None or v.startswith(("s3://", "file://", LINEAGE_PREFIX)) or DNS1123.match(v):
            return v
        raise ValueError(
            f"'{v}' is neither a checkpoint URI (s3://..., file://...), a run name, nor lineage:<id>"
        )

    @property
    def stage_params(self) -> BaseModel:
        return getattr(self, self.stage)  # type: ignore[attr-defined]

    @property
    def global_rows(self) -> tuple[str, int]:
        """The sequences of one step's global batch, and the field(s) that set them."""
        return "training.batchSize", self.training.batch_size

    @model_validator(mode="after")
    def _rows_split_over_ranks(self) -> "RunSpecBase":
        # every rank trains on an equal share of the global batch: with unequal shares ranks run different
        # numbers of micro-batches and FSDP's collectives wait forever (a rank with no rows hangs them all)
        fields, rows = self.global_rows
        world = self.parallelism.world_size
        if rows % world:
            raise ValueError(f"{fields} = {rows} sequences a step do not split evenly over the world size {world} "
                             f"(parallelism.nodes x procsPerNode): use a multiple of {world}")
        return self

    @property
    def data_uri(self) -> str:
        """The data this run reads: spec.data.uri, else the stage's builtin corpus (the trainer, the operator's
        lineage record and `flashops run` all use this, so both paths record the same dataset)."""
        return self.data.uri if self.data else DEFAULT_DATA[self.stage]  # type: ignore[attr-defined]


class PretrainRunSpec(RunSpecBase):
    stage: Literal["pretrain"] = "pretrain"
    pretrain: PretrainParams = Field(default_factory=PretrainParams)


class SFTRunSpec(RunSpecBase):
    stage: Literal["sft"] = "sft"
    sft: SFTParams = Field(default_factory=SFTParams)


class DPORunSpec(RunSpecBase):
    stage: Literal["dpo"] = "dpo"
    dpo: DPOParams = Field(default_factory=DPOParams)


class RLRunSpec(RunSpecBase):
    stage: Literal["rl"] = "rl"
    rl: RLParams = Field(default_factory=RLParams)

    @property
    def global_rows(self) -> tuple[str, int]:
        return "rl.groupSize x rl.promptsPerStep", self.rl.group_size * self.rl.prompts_per_step


TrainingRunSpec = Annotated[
    Union[PretrainRunSpec, SFTRunSpec, DPORunSpec, RLRunSpec], Field(discriminator="stage")
]

EVAL_STAGE = "eval"


class EvalParams(Spec):
    suites: list[str] = Field(min_length=1, max_length=16, description="builtin:rl-heldout, builtin:chat-smoke, "
                              "file:///x.jsonl or s3://bucket/x.jsonl (flashops.api.evaluation)")
    max_tokens: int = Field(64, ge=1, le=32768, description="generated tokens per task at most")
    mtp_tokens: int = Field(0, ge=0, le=3, description="speculative depth of the answering pass (acceptance at "
                            "k=1..3 is measured either way)")
    max_concurrency: int = Field(16, ge=1, le=256, description="tasks decoded together")

    @field_validator("suites")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        for uri in v:
            if not uri.startswith(("builtin:", "file://", "s3://")):
                raise ValueError(f"suite '{uri}': use builtin:rl-heldout, builtin:chat-smoke, file:///path.jsonl "
                                 "or s3://bucket/key.jsonl")
        return v


class EvalStageSpec(Spec):
    """A pipeline stage that evaluates the previous stage's final checkpoint and records the result in lineage
    on that checkpoint. It trains nothing: the next stage still starts from the previous training stage, and
    it never exports (flashops.api.pipeline). On a cluster it runs as a Job (`flashops eval`)."""
    stage: Literal["eval"] = "eval"
    eval: EvalParams
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: S3AccessSpec | None = None
    image: str | None = None
    backoff_limit: int = Field(3, ge=0, description="retries of the evaluation Job (as a training stage's)")
    # Accepted for CRDs generated before the stage union dropped training-only defaults (api/crds.py _merge), where
    # the API server defaulted suspend: false into an eval stage; true holds the stage like spec.suspend does.
    suspend: bool = Field(False, description="hold this evaluation (its Job is not created while true)")

    @property
    def stage_params(self) -> BaseModel:
        return self.eval


PipelineStageSpec = Annotated[
    Union[PretrainRunSpec, SFTRunSpec, DPORunSpec, RLRunSpec, EvalStageSpec], Field(discriminator="stage")
]


# --------------------------------------------------------------------------- status


class Condition(Spec):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = Field(default_factory=lambda: now_rfc3339())


class ChildRef(Spec):
    api_version: str
    kind: str
    name: str
    namespace: str | None = None


class StageStatus(Spec):
    name: str
    stage: str
    run: str | None = None
    state: str = "Pending"
    checkpoint: str | None = None


CONDITION_TYPES = ("Accepted", "Pending", "Running", "Succeeded", "Failed", "Suspended", "Ready")


class PromotionCheck(Spec):
    """One requirement of a promotion gate, with its numbers (flashops.api.promotion.Check)."""

    suite: str
    mode: str
    metric: str
    value: float | None = Field(None, description="the candidate model's recorded value")
    min: float | None = None
    max: float | None = None
    current: float | None = Field(None, description="the current model's recorded value (compareTo: current)")
    required: float | None = Field(None, description="the bound the current model sets: current +- minImprovement")
    k: int | None = Field(None, description="acceptance_length's number of draft tokens")
    passed: bool = False
    problem: str | None = Field(None, description="why there is no number to compare, and the fix")


class PromotionStatus(Spec):
    """The last promotion decision of a ModelDeployment (flashops.api.promotion.decide)."""

    passed: bool
    candidate: str = Field(description="the model the decision is about")
    current: str | None = Field(None, description="the model served when it was made")
    message: str = ""
    checks: list[PromotionCheck] = Field(default_factory=list)


class ObjectStatus(Spec):
    """Status shared by all three kinds; fields a kind does not use stay empty. The operator writes status
    through this model (flashops.operator.reconcile.write_status), so every field it sets is in the CRD schema;
    extra keys are kopf's own bookkeeping."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)
    state: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    children: list[ChildRef] = Field(default_factory=list)
    latest_checkpoint: str | None = None
    lineage_id: str | None = None
    retries: int = 0
    stage: str | None = None
    stages: list[StageStatus] = Field(default_factory=list)
    url: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    # ---- TrainingRun retries and lineage, serving exports
    retry_reason: str | None = Field(None, description="why the current attempt exists (the previous one's failure)")
    resumed_from: str | None = Field(None, description="the checkpoint the current attempt resumes from")
    lineage_closed: bool | None = Field(None, description="the lineage run was finished with the final state")
    model_uri: str | None = Field(None, description="the serving export of the final checkpoint (a standalone run's "
                                                     "or a pipeline's final stage's): what a ModelDeployment serves")
    applied_generation: int | None = Field(None, description="the spec generation the current attempt trains with")
    applied_spec_hash: str | None = Field(None, description="hash of the trainer spec the current attempt trains with")
    spec_change: str | None = Field(None, description="a spec edit waiting for the next attempt (live edits are "
                                                       "never applied to a running attempt)")
    # ---- ModelDeployment promotion (issue 15 item 4)
    promotion: PromotionStatus | None = Field(None, description="the last promotion gate decision, with its numbers")
    mtp_tokens: int | None = Field(None, description="the MTP draft tokens served (speculative.mtpTokens: auto, resolved)")
    mtp_choice: str | None = Field(None, description="why mtpTokens: auto picked that k (the expected speedups)")
    canary_model: str | None = Field(None, description="the model on the canary share (canaryTrafficPercent) while the "
                                                        "previous one keeps the rest")


# --------------------------------------------------------------------------- the three kinds


class SpecObject(BaseModel):
    """What every flashops object has (apiVersion, kind, metadata); the operator and loader type against it."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["flashops.dev/v1alpha1"] = Field(API_GROUP_VERSION, alias="apiVersion")
    metadata: ObjectMeta
    status: ObjectStatus | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @property
    def name(self) -> str:
        return self.metadata.name

    def spec_hash(self) -> str:
        """sha256 of the canonical spec JSON: what lineage and checkpoints record."""
        return spec_hash(self.spec.to_dict())  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _name_fits_children(self) -> "SpecObject":
        kind = getattr(self, "kind", "")
        limit = NAME_MAX_LENGTH.get(kind, 63)
        name = self.metadata.name
        if len(name) > limit:
            raise ValueError(f"metadata.name: '{name}' is {len(name)} characters; a {kind} name may have at most "
                             f"{limit} ({NAME_WHY[kind]} must stay a 63-character label): choose a shorter name")
        for stage in getattr(getattr(self, "spec", None), "stages", None) or []:
            if len(name) + 1 + len(stage.name) > 63:
                raise ValueError(
                    f"spec.stages: stage '{stage.name}' runs as TrainingRun '{name}-{stage.name}', "
                    f"{len(name) + 1 + len(stage.name)} characters (at most 63): shorten the pipeline or the stage name")
        return self


def name_rules(kind: str) -> list[dict[str, str]]:
    """The CRD's CEL form of the name checks above (ObjectMeta._dns_name, SpecObject._name_fits_children)."""
    limit = NAME_MAX_LENGTH[kind]
    rules = [
        {"rule": f"self.metadata.name.matches('{RFC1035_PATTERN}')",
         "message": "metadata.name must be an RFC 1035 label: lower-case letters, digits and '-', starting with a "
                    f"letter and ending with a letter or digit (required by {NAME_WHY[kind]})"},
        {"rule": f"size(self.metadata.name) <= {limit}",
         "message": f"metadata.name may have at most {limit} characters ({NAME_WHY[kind]} must stay a 63-character label)"},
    ]
    if kind == "TrainingPipeline":
        rules.append({"rule": "self.spec.stages.all(s, size(self.metadata.name) + 1 + size(s.name) <= 63)",
                      "message": "each stage runs as the TrainingRun <pipeline>-<stage>, at most 63 characters: "
                                 "shorten the pipeline or the stage names"})
    return rules


class TrainingRun(SpecObject):
    kind: Literal["TrainingRun"] = "TrainingRun"
    spec: TrainingRunSpec


class PipelineStage(BaseModel):
    """One stage of a pipeline: a name plus a TrainingRun spec (its template), or `stage: eval` (an evaluation
    of the previous stage's checkpoint)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(json_schema_extra={"maxLength": 63})
    spec: PipelineStageSpec

    @property
    def is_eval(self) -> bool:
        return self.spec.stage == EVAL_STAGE

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return _dns_label(v)


class TrainingPipelineSpec(Spec):
    # A list map keyed by name (issue 17 item 2): `kubectl apply --server-side` merges stages by name
    # instead of owning the whole list, and the API server itself refuses two stages of one name.
    stages: list[PipelineStage] = Field(min_length=1, max_length=MAX_STAGES, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    suspend: bool = False

    @model_validator(mode="after")
    def _unique(self) -> "TrainingPipelineSpec":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dup)}")
        if self.stages[0].is_eval:
            raise ValueError(f"stage '{self.stages[0].name}' (stage: eval) is first, so there is no checkpoint to "
                             "evaluate: put eval stages after a training stage")
        return self


class TrainingPipeline(SpecObject):
    kind: Literal["TrainingPipeline"] = "TrainingPipeline"
    spec: TrainingPipelineSpec


MTP_AUTO = "auto"


class SpeculativeSpec(Spec):
    mtp_tokens: Union[int, str] = Field(
        0, description="draft tokens per step from the MTP layer: 0 (off) to 3, or auto: the k with the best expected "
                       "speedup, acceptance_length(k) / (1 + k x mtp_cost_ratio), from the served model's recorded "
                       "evaluation (flashops eval); 0 when none is recorded (flashops.api.promotion.choose_mtp_tokens)",
        json_schema_extra={"x-kubernetes-validations": [{
            "rule": "type(self) == string ? self == 'auto' : (self >= 0 && self <= 3)",
            "message": "mtpTokens must be 0 (off) to 3, or auto"}]})

    @field_validator("mtp_tokens", mode="before")
    @classmethod
    def _k_or_auto(cls, v: Any) -> int | str:
        if v == MTP_AUTO or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 3):
            return v
        raise ValueError(f"{v!r} is not a number of draft tokens: use 0 (off) to 3, or auto (picked from the "
                         "model's recorded evaluation)")


# --------------------------------------------------------------------------- promotion gates (issue 15 item 4)

# The metrics `flashops eval` records per suite and mode (suites[].modes[].<metric>), and which way is better.
PROMOTION_METRICS = {"accuracy": "higher", "accuracy_per_1k_tokens": "higher", "mean_tokens": "lower",
                     "acceptance_length": "higher"}
EVAL_MODES = ("thinking", "non-thinking")
MAX_PROMOTION_RULES = 16


class PromotionRequirement(Spec):
    """One number a new model's recorded evaluation must reach before it is served."""

    model_config = cel_rules(
        ("!has(self.min) || !has(self.max) || self.min <= self.max", "min is larger than max: set max >= min"),
        ("!has(self.k) || self.metric == 'acceptance_length'", "k applies to metric acceptance_length only: remove it"),
    )
    suite: str = Field(min_length=1, max_length=2048, description=(
        "the evaluation suite, as `flashops eval --suite` names it (builtin:rl-heldout, file:///..., s3://...)"))
    metric: Literal["accuracy", "accuracy_per_1k_tokens", "mean_tokens", "acceptance_length"] = Field(description=(
        "an evaluation key: accuracy, accuracy_per_1k_tokens, mean_tokens (lower is better) or acceptance_length"))
    min: float | None = Field(None, description="the value must be at least this")
    max: float | None = Field(None, description="the value must be at most this (e.g. mean_tokens)")
    mode: Literal["thinking", "non-thinking"] | None = Field(None, description=(
        "which mode's result counts; default: the deployment's (thinking: true -> thinking, else non-thinking)"))
    k: int | None = Field(None, ge=1, le=3, description=(
        "acceptance_length at k draft tokens; default: the deployment's mtpTokens when it is 1-3, else the largest "
        "k recorded"))

    @model_validator(mode="after")
    def _bounds(self) -> "PromotionRequirement":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}: set max >= min")
        if self.k is not None and self.metric != "acceptance_length":
            raise ValueError(f"k {self.k} applies to metric acceptance_length only (metric is {self.metric}): remove it")
        return self


class PromotionSpec(Spec):
    """Serve a new model only when its recorded evaluation passes (flashops.api.promotion.decide). A failed gate
    leaves the current model serving; status condition PromotionBlocked and an Event give the numbers."""

    model_config = cel_rules((
        "self.compareTo == 'current' || self.require.all(r, has(r.min) || has(r.max))",
        "a requirement without min or max checks nothing when compareTo is none: give it a min or max"))
    require: list[PromotionRequirement] = Field(min_length=1, max_length=MAX_PROMOTION_RULES, description=(
        "every requirement must pass: {suite, metric, min|max, mode, k}"))
    compare_to: Literal["current", "none"] = Field("current", description=(
        "current: also be at least as good as the model served now (by minImprovement), on every required "
        "metric; none: thresholds only"))
    min_improvement: float = Field(0.0, ge=0, description=(
        "with compareTo current: how much better than the current model, in the metric's own units (0.02 = two "
        "accuracy points; for mean_tokens, that many fewer tokens)"))

    @model_validator(mode="after")
    def _checks_something(self) -> "PromotionSpec":
        if self.compare_to == "none":
            empty = [i for i, r in enumerate(self.require) if r.min is None and r.max is None]
            if empty:
                raise ValueError(f"require[{empty[0]}] has neither min nor max and compareTo is none, so it checks "
                                 "nothing: give it a min or max, or set compareTo: current")
        return self


class ReplicasSpec(Spec):
    model_config = cel_rules(("self.min <= self.max", "min is larger than max: set max >= min"))
    min: int = Field(1, ge=0, description="0 allows scale to zero")
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "ReplicasSpec":
        if self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}: set max >= min")
        return self


# ModelDeployment.spec.runtime (issue 14): which server a deployment runs. flashops: `python -m flashops.serving`
# in a custom predictor (one process, CPU or one GPU); vllm: KServe's Hugging Face runtime with its vLLM backend
# (GPUs, tensor/expert parallelism). docs/serving.md says when to pick which.
SERVING_RUNTIMES = ("flashops", "vllm")
MAX_TENSOR_PARALLEL = 64  # 8 nodes of 8 GPUs; vLLM's tensor parallelism stays within one replica


class ServingParallelismSpec(Spec):
    """How one replica of a runtime: vllm deployment spreads the model over its GPUs."""

    tensor: int = Field(1, ge=1, le=MAX_TENSOR_PARALLEL, description=(
        "tensor-parallel degree: GPUs one replica shards every layer over (vLLM --tensor-parallel-size); the "
        "replica requests this many nvidia.com/gpu"))
    expert: bool = Field(False, description=(
        "expert parallelism for the MoE layers (vLLM --enable-expert-parallel): each GPU holds a share of the "
        "routed experts whole instead of a slice of every expert; pays off from tensor >= 2"))


VLLM_STORAGE_SCHEMES = ("s3://", "gs://", "hf://", "pvc://", "https://")  # what KServe's storageUri downloads
_VLLM_ONLY_IF = "!(has(self.runtime) && self.runtime == 'vllm') || "  # CEL: the rule binds runtime vllm only


class ModelDeploymentSpec(Spec):
    model_config = cel_rules(
        ("(has(self.runtime) && self.runtime == 'vllm') || !has(self.parallelism)",
         "parallelism applies to runtime: vllm only (the flashops runtime is one process): drop parallelism or "
         "set runtime: vllm"),
        (_VLLM_ONLY_IF + "!has(self.resources) || !has(self.resources.gpu) || self.resources.gpu == 0 || "
         "self.resources.gpu == (has(self.parallelism) && has(self.parallelism.tensor) ? self.parallelism.tensor : 1)",
         "resources.gpu must equal parallelism.tensor with runtime vllm (vLLM uses exactly tensor GPUs per "
         "replica): set both to the same number, or leave resources.gpu out"),
        (_VLLM_ONLY_IF + "!self.source.startsWith('file://')",
         "runtime vllm cannot serve a file:// source (KServe's storage initializer downloads it): use an s3:// "
         "export or runtime: flashops"),
        (_VLLM_ONLY_IF + "!has(self.storage)",
         "runtime vllm takes S3 settings from the predictor's service account, not spec.storage: drop storage "
         "(docs/serving.md) or use runtime: flashops"),
        (_VLLM_ONLY_IF + "!has(self.thinking) || !self.thinking",
         "thinking is a flashops runtime switch: drop it with runtime vllm, or use runtime: flashops"),
        (_VLLM_ONLY_IF + "!has(self.speculative) || !has(self.speculative.mtpTokens) || "
         "type(self.speculative.mtpTokens) != string",
         "speculative.mtpTokens: auto is not resolved for runtime vllm: give vLLM a number of draft tokens, 0 to 3"),
    )

    source: str = Field(description="model/checkpoint URI, a TrainingRun or TrainingPipeline name, or lineage:<id>")
    runtime: Literal["flashops", "vllm"] = Field("flashops", description=(
        "the model server: flashops (default; python -m flashops.serving, CPU or one GPU) or vllm (KServe's "
        "Hugging Face runtime with --backend=vllm: GPUs, tensor and expert parallelism, MTP speculation). Both "
        "answer at /openai/v1/... under the deployment's name; see docs/serving.md"))
    parallelism: ServingParallelismSpec | None = Field(None, description=(
        "runtime: vllm only: {tensor: N, expert: true|false}; default tensor 1, no expert parallelism"))
    quantization: Literal["none", "int4"] = "none"
    speculative: SpeculativeSpec = Field(default_factory=SpeculativeSpec)
    thinking: bool = False
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec)
    canary_traffic_percent: int | None = Field(None, ge=0, le=100)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: S3AccessSpec | None = None
    image: str | None = None
    max_concurrency: int = Field(8, ge=1, description="requests served at once; more queue, then 429")
    promotion: PromotionSpec | None = Field(None, description=(
        "a gate on the model's recorded evaluation: a model that fails it is not served (the current one stays)"))

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith(("s3://", "file://", LINEAGE_PREFIX)) or DNS1123.match(v):
            return v
        raise ValueError(
            f"'{v}' is neither a model URI (s3://..., file://...), a run or pipeline name, nor lineage:<id>"
        )

    @model_validator(mode="after")
    def _runtime_combination(self) -> "ModelDeploymentSpec":
        """Combinations that cannot serve, refused before anything is built (the CEL rules above say the same)."""
        if self.runtime == "flashops":
            if self.parallelism is not None:
                raise ValueError("parallelism applies to runtime: vllm only (the flashops runtime is one process "
                                 "on one device): drop parallelism or set runtime: vllm")
            return self
        tensor = self.parallelism.tensor if self.parallelism else 1
        if self.resources.gpu and self.resources.gpu != tensor:
            raise ValueError(
                f"resources.gpu {self.resources.gpu} does not match parallelism.tensor {tensor}: vLLM uses exactly "
                f"tensor GPUs per replica, so set resources.gpu: {tensor}, or parallelism.tensor: "
                f"{self.resources.gpu}, or leave resources.gpu out (the replica then requests {tensor})")
        if self.source.startswith("file://"):
            raise ValueError(f"source {self.source}: runtime vllm downloads the model with KServe's storage "
                             f"initializer, which cannot read file:// URIs: serve an s3:// export (flashops "
                             f"checkpoints export ... to an s3:// store) or use runtime: flashops")
        if self.storage is not None:
            raise ValueError("storage: runtime vllm downloads the model through KServe's storage initializer, "
                             "which takes the S3 endpoint and credentials from the predictor's service account "
                             "(the chart's flashops-serving), not from spec.storage: drop storage here and set "
                             "the endpoint in the chart (docs/serving.md), or use runtime: flashops")
        if self.speculative.mtp_tokens == MTP_AUTO:
            raise ValueError("speculative.mtpTokens: auto is not resolved for runtime vllm (vLLM takes a fixed "
                             "num_speculative_tokens): give a number, 0 to 3, e.g. the k `flashops eval` measured best")
        if self.thinking:
            raise ValueError("thinking: the server-wide thinking default is a flashops runtime switch that the vllm "
                             "runtime does not have: drop it with runtime vllm, or use runtime: flashops")
        return self

    @property
    def gpus(self) -> int:
        """GPUs one replica requests: resources.gpu, or with runtime vllm the tensor-parallel degree."""
        if self.runtime == "vllm":
            return self.parallelism.tensor if self.parallelism else 1
        return self.resources.gpu


class ModelDeployment(SpecObject):
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    spec: ModelDeploymentSpec


FlashopsObject = Annotated[
    Union[TrainingRun, TrainingPipeline, ModelDeployment], Field(discriminator="kind")
]
KINDS: dict[str, type[SpecObject]] = {
    "TrainingRun": TrainingRun,
    "TrainingPipeline": TrainingPipeline,
    "ModelDeployment": ModelDeployment,
}
PLURALS = {"TrainingRun": "trainingruns", "TrainingPipeline": "trainingpipelines", "ModelDeployment": "modeldeployments"}


# --------------------------------------------------------------------------- helpers


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def spec_hash(spec: dict[str, Any]) -> str:
    canon = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def pipeline_stage_run(pipeline: TrainingPipeline, index: int, previous_checkpoint: str | None):
    """The TrainingRun a pipeline creates for stage `index`, or the EvaluationJob of an eval stage
    (flashops.api.pipeline.stage_run: the one rule)."""
    from flashops.api.pipeline import stage_run

    return stage_run(pipeline, index, previous_checkpoint)


# parsing and errors live in flashops.api.loader; re-exported for callers.
from flashops.api.loader import SpecError, load_file, load_text, parse_object  # noqa: E402,F401
