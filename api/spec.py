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

API_GROUP = "flashops.dev"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# The model presets flashops.model provides (a test checks the two lists agree). Kept here so
# validation needs no torch and the api layer imports nothing above it.
MODEL_PRESETS = ("joyai-flash-debug", "joyai-flash-small", "joyai-flash-48b-a3b")
STAGES = ("pretrain", "sft", "dpo", "rl")
RL_ALGORITHMS = ("fiberpo", "grpo", "gspo")
DATA_SCHEMES = ("builtin:", "file://", "s3://")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LINEAGE_PREFIX = "lineage:"


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
        if len(v) > 63 or not DNS1123.match(v):
            raise ValueError(
                f"'{v}' is not a valid name: use lower-case letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return v


class ModelRef(Spec):
    """Which architecture: a preset plus overrides of flashops.model.config.JoyAIConfig fields (e.g. {n_layers: 2})."""

    preset: str = "joyai-flash-debug"
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict)

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
    lr: float = Field(3e-3, gt=0)
    min_lr: float | None = Field(None, ge=0, description="end of the decay; default lr/10")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd: share of steps spent decaying")
    grad_clip: float = Field(1.0, ge=0)


class TrainingSpec(Spec):
    """Loop sizes. global batch = batchSize sequences of seqLen tokens per optimizer step."""

    steps: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="default: batchSize (no accumulation)")
    seq_len: int = Field(128, ge=8)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _accumulation(self) -> "TrainingSpec":
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batchSize {self.batch_size} is not a multiple of microBatchSize "
                f"{self.micro_batch_size}: pick a microBatchSize that divides it"
            )
        return self


class ParallelismSpec(Spec):
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


class CheckpointSpec(Spec):
    every: int = Field(10, ge=1, description="save every N steps (and at the end)")
    keep: int = Field(3, ge=1, description="keep the newest K (pinned ones are never deleted)")
    uri: str | None = Field(None, description="store root: s3://bucket/prefix or file:///dir")

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


class SFTParams(Spec):
    thinking_ratio: float = Field(0.5, ge=0, le=1, description="share of conversations in thinking mode")
    packing: Literal["best-fit", "none"] = "best-fit"


class DPOParams(Spec):
    beta: float = Field(0.1, gt=0)
    reference: str | None = Field(None, description="reference policy; default: the initFrom checkpoint")


class RLParams(Spec):
    algorithm: Literal["fiberpo", "grpo", "gspo"] = "fiberpo"
    eps: float = Field(0.2, gt=0, description="FiberPO token clip / GRPO clip")
    delta: float = Field(0.4, gt=0, description="FiberPO trajectory band, cPlus + cMinus")
    c_plus: float | None = Field(None, gt=0, description="default delta/2")
    c_minus: float | None = Field(None, gt=0, description="default delta/2")
    group_size: int = Field(4, ge=2, description="rollouts per prompt (the group for advantages)")
    prompts_per_step: int = Field(4, ge=1)
    updates_per_batch: int = Field(2, ge=1, description="policy updates per rollout batch")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    curriculum: bool = True
    kl_coef: float = Field(0.0, ge=0)
    domains: list[str] | None = None

    @model_validator(mode="after")
    def _band(self) -> "RLParams":
        if self.c_plus is not None and self.c_minus is not None:
            if abs(self.c_plus + self.c_minus - self.delta) > 1e-9:
                raise ValueError(
                    f"cPlus {self.c_plus} + cMinus {self.c_minus} must equal delta {self.delta}: "
                    "set both to add up to delta, or leave them out (each defaults to delta/2)"
                )
        return self

    @property
    def c_plus_value(self) -> float:
        if self.c_plus is not None:
            return self.c_plus
        return self.delta - self.c_minus if self.c_minus is not None else self.delta / 2

    @property
    def c_minus_value(self) -> float:
        return self.delta - self.c_plus_value


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


TrainingRunSpec = Annotated[
    Union[PretrainRunSpec, SFTRunSpec, DPORunSpec, RLRunSpec], Field(discriminator="stage")
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


class ObjectStatus(Spec):
    """Status shared by all three kinds; fields a kind does not use stay empty."""

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


# --------------------------------------------------------------------------- the three kinds


class _Object(BaseModel):
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


class TrainingRun(_Object):
    kind: Literal["TrainingRun"] = "TrainingRun"
    spec: TrainingRunSpec


class PipelineStage(BaseModel):
    """One stage of a pipeline: a name plus a TrainingRun spec (its template)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    spec: TrainingRunSpec

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return ObjectMeta._dns_name(v)


class TrainingPipelineSpec(Spec):
    stages: list[PipelineStage] = Field(min_length=1)
    suspend: bool = False

    @model_validator(mode="after")
    def _unique(self) -> "TrainingPipelineSpec":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dup)}")
        return self


class TrainingPipeline(_Object):
    kind: Literal["TrainingPipeline"] = "TrainingPipeline"
    spec: TrainingPipelineSpec


class SpeculativeSpec(Spec):
    mtp_tokens: int = Field(0, ge=0, le=3, description="draft tokens per step from the MTP layer (0 = off)")


class ReplicasSpec(Spec):
    min: int = Field(1, ge=0, description="0 allows scale to zero")
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "ReplicasSpec":
        if self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}: set max >= min")
        return self


class ModelDeploymentSpec(Spec):
    source: str = Field(description="model/checkpoint URI, a TrainingRun or TrainingPipeline name, or lineage:<id>")
    quantization: Literal["none", "int4"] = "none"
    speculative: SpeculativeSpec = Field(default_factory=SpeculativeSpec)
    thinking: bool = False
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec)
    canary_traffic_percent: int | None = Field(None, ge=0, le=100)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: S3AccessSpec | None = None
    image: str | None = None
    max_concurrency: int = Field(8, ge=1, description="requests served at once; more queue, then 429")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith(("s3://", "file://", LINEAGE_PREFIX)) or DNS1123.match(v):
            return v
        raise ValueError(
            f"'{v}' is neither a model URI (s3://..., file://...), a run or pipeline name, nor lineage:<id>"
        )


class ModelDeployment(_Object):
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    spec: ModelDeploymentSpec


FlashopsObject = Annotated[
    Union[TrainingRun, TrainingPipeline, ModelDeployment], Field(discriminator="kind")
]
KINDS: dict[str, type[_Object]] = {
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


def pipeline_stage_run(pipeline: TrainingPipeline, index: int, previous_checkpoint: str | None) -> TrainingRun:
    """The TrainingRun a pipeline creates for stage `index`.

    A stage without initFrom starts from the previous stage's final checkpoint. Used by both the
    operator and the local runner, so the two agree on names and wiring.
    """
    stage = pipeline.spec.stages[index]
    spec = stage.spec.model_copy(deep=True)
    if spec.init_from is None and previous_checkpoint is not None:
        spec.init_from = previous_checkpoint
    return TrainingRun(
        metadata=ObjectMeta(
            name=f"{pipeline.metadata.name}-{stage.name}"[:63].rstrip("-"),
            namespace=pipeline.metadata.namespace,
            labels={**pipeline.metadata.labels, "flashops.dev/pipeline": pipeline.metadata.name,
                    "flashops.dev/stage": stage.name},
        ),
        spec=spec,
    )


# parsing and errors live in flashops.api.loader; re-exported for callers.
from flashops.api.loader import SpecError, load_file, load_text, parse_object  # noqa: E402,F401
