"""Everything checked before compute starts: spec values and combinations, the model config, the data,
the checkpoint a run starts from, the process count. One error names the field, the value and the fix.

    plan = preflight(run, store, lineage)   # -> Plan(model_config, dataset, init_uri, ...)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from flashops.api.spec import LINEAGE_PREFIX, TrainingRun
from flashops.trainers.corpora import DEFAULT_DATA, open_dataset
from flashops.trainers.errors import DataError, SpecValueError


@dataclass
class Plan:
    model_config: Any
    dataset: Any
    data_uri: str
    init_uri: str | None
    reference_uri: str | None
    updates_per_step: int
    micro_batch_size: int
    dtype: Any

    def start_lineage(self, lineage, run: TrainingRun):
        ds = lineage.upsert_dataset(self.data_uri)
        pipeline = run.metadata.labels.get("flashops.dev/pipeline")
        return lineage.start_run(run.metadata.name, "TrainingRun", run.spec.stage, run.spec.to_dict(), run.spec_hash(),
                                 consumed=[ds], initialized_from=self.init_uri, pipeline=pipeline)


_ALIASES = {"num_layers": "n_layers", "num_heads": "n_heads", "num_dense_layers": "n_dense_layers"}


def _snake(key: str) -> str:
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
    return _ALIASES.get(snake, snake)


def _fail(field: str, value, fix: str):
    raise SpecValueError(f"spec.{field} = {value!r}: {fix}")


def resolve_checkpoint(ref: str, store, lineage, field: str) -> str:
    """A checkpoint URI for `ref` (a URI, a run name or lineage:<id>), checked to exist."""
    from flashops.storage import StoreError, open_store, split_checkpoint_uri

    if ref.startswith(("file://", "s3://")):
        try:
            root, run, step = split_checkpoint_uri(ref)
            open_store(root).meta(ref)
        except StoreError as e:
            raise DataError(f"spec.{field} = {ref!r}: no complete checkpoint there ({e}); "
                            "check the URI (flashops checkpoints list)") from e
        return ref
    if ref.startswith(LINEAGE_PREFIX) or lineage is not None:
        if lineage is not None:
            try:
                found = lineage.resolve(ref)
            except Exception as e:  # NotFound and friends: say what to do
                if ref.startswith(LINEAGE_PREFIX) or store is None:
                    raise DataError(f"spec.{field} = {ref!r}: lineage does not know it ({e}); run that stage first "
                                    "or give a checkpoint URI") from e
                found = None
            uri = (found or {}).get("checkpoint", {}) or {}
            uri = uri.get("uri") if isinstance(uri, dict) else None
            if uri:
                return uri
    if store is not None and not ref.startswith(LINEAGE_PREFIX):
        latest = store.latest(ref)
        if latest is not None:
            return latest.uri
    raise DataError(f"spec.{field} = {ref!r}: no checkpoint found for it (not in lineage, no run of that name in "
                    f"the store {getattr(store, 'uri', None)}); run that stage first or give a checkpoint URI")


def preflight(run: TrainingRun, store=None, lineage=None, *, check_init: bool = True) -> Plan:
    """check_init=False: a pipeline stage whose initFrom is the previous stage's (not yet trained) output."""
    import torch

    from flashops.model.config import ConfigError, get_config
    from flashops.model.tokenizer import load_tokenizer

    spec = run.spec
    tr = spec.training
    try:  # YAML spells fields in camelCase (numLayers); the model config in snake_case (n_layers)
        overrides = {_snake(k): v for k, v in spec.model.overrides.items()}
        cfg = get_config(spec.model.preset, overrides)
    except ConfigError as e:
        raise SpecValueError(f"spec.model.overrides: {e}") from e
    vocab = load_tokenizer().get_vocab_size()
    if cfg.vocab_size < vocab:
        _fail("model.overrides.vocabSize", cfg.vocab_size, f"the tokenizer has {vocab} tokens; use vocabSize >= {vocab}")
    if tr.seq_len > cfg.max_seq_len:
        _fail("training.seqLen", tr.seq_len, f"longer than the model's max_seq_len {cfg.max_seq_len}; lower seqLen "
              "or set model.overrides.maxSeqLen")
    micro = tr.micro_batch_size or tr.batch_size
    if micro > tr.batch_size:
        _fail("training.microBatchSize", micro, f"larger than batchSize {tr.batch_size}; use a divisor of it")
    opt = spec.optimizer
    if opt.min_lr is not None and opt.min_lr > opt.lr:
        _fail("optimizer.minLr", opt.min_lr, f"above lr {opt.lr}; the schedule decays from lr to minLr")
    if opt.warmup_steps >= tr.steps * (spec.rl.updates_per_batch if spec.stage == "rl" else 1) and opt.warmup_steps:
        _fail("optimizer.warmupSteps", opt.warmup_steps, f"not below the number of optimizer steps; lower it")
    if spec.checkpoint.every > tr.steps and spec.checkpoint.every != 10:
        pass  # saving only at the end is fine
    updates = 1
    reference_uri = None
    if spec.stage == "pretrain":
        if spec.pretrain.mtp_weight > 0 and cfg.num_mtp_layers == 0:
            _fail("pretrain.mtpWeight", spec.pretrain.mtp_weight, "the model has no MTP layer (numMtpLayers: 0); "
                  "set mtpWeight: 0")
    if spec.stage == "rl":
        rl = spec.rl
        updates = rl.updates_per_batch
        rows = rl.group_size * rl.prompts_per_step
        if tr.micro_batch_size and rows % tr.micro_batch_size:
            _fail("training.microBatchSize", tr.micro_batch_size, f"must divide groupSize x promptsPerStep = {rows} "
                  "(the RL batch)")
        if tr.seq_len < rl.max_new_tokens + 8:
            _fail("rl.maxNewTokens", rl.max_new_tokens, f"leaves no room for the prompt in seqLen {tr.seq_len}")
        if rl.domains:
            from flashops.trainers.tasks import DOMAINS

            bad = [d for d in rl.domains if d not in DOMAINS]
            if bad:
                _fail("rl.domains", rl.domains, f"unknown domain(s) {bad}; use some of {', '.join(DOMAINS)}")
    if spec.stage in ("dpo", "rl") and spec.init_from is None and check_init:
        _fail("initFrom", None, f"a {spec.stage} run starts from a trained policy: set initFrom to a checkpoint URI, "
              "a run name or lineage:<id> (in a pipeline, the previous stage provides it)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if spec.parallelism.world_size != world:
        if world == 1:
            _fail("parallelism", f"{spec.parallelism.nodes} x {spec.parallelism.procs_per_node}",
                  f"needs {spec.parallelism.world_size} processes; launch with `torchrun --nproc-per-node "
                  f"{spec.parallelism.procs_per_node} -m flashops.trainers --spec FILE`, or set procsPerNode: 1")
        _fail("parallelism", spec.parallelism.world_size, f"torchrun started {world} processes; make them agree")
    if spec.parallelism.ep > 1 and cfg.num_experts % spec.parallelism.ep:
        _fail("parallelism.ep", spec.parallelism.ep, f"must divide the model's {cfg.num_experts} experts")
    if tr.dtype == "bfloat16" or (tr.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    data_uri = spec.data.uri if spec.data else DEFAULT_DATA[spec.stage]
    dataset = open_dataset(data_uri, spec.stage, tr.seed, spec.data.format if spec.data else "auto",
                           spec.stage_params)
    init_uri = resolve_checkpoint(spec.init_from, store, lineage, "initFrom") if spec.init_from and check_init else None
    if spec.stage == "dpo":
        reference_uri = (resolve_checkpoint(spec.dpo.reference, store, lineage, "dpo.reference")
                         if spec.dpo.reference and check_init else init_uri)
    if spec.stage == "rl":
        reference_uri = init_uri
    if init_uri:
        _check_compatible(init_uri, cfg)
    return Plan(cfg, dataset, data_uri, init_uri, reference_uri, updates, micro, dtype)


def _check_compatible(uri: str, cfg) -> None:
    from flashops.storage import open_store, split_checkpoint_uri

    root, _, _ = split_checkpoint_uri(uri)
    meta = open_store(root).meta(uri)
    theirs = meta.model_config or {}
    ours = cfg.to_dict()
    diff = sorted(k for k in ours if k in theirs and theirs[k] != ours[k] and k not in ("extra", "attention"))
    if diff:
        raise SpecValueError(f"spec.initFrom = {uri!r}: its model differs in {', '.join(diff)} "
                             f"(checkpoint {[theirs[k] for k in diff]} vs spec {[ours[k] for k in diff]}); "
                             "set spec.model to the checkpoint's preset and overrides")
