"""Everything checked before compute starts: spec values and combinations, the model config, the data,
the checkpoint a run starts from, the process count. One error names the field, the value and the fix.

    plan = preflight(run, store, lineage)   # -> Plan(model_config, dataset, init_uri, ...)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flashops.api.spec import TrainingRun
from flashops.trainers.corpora import open_dataset
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
        from flashops.trainers.corpora import lineage_identity

        ds = lineage.upsert_dataset(**lineage_identity(self.dataset, self.data_uri))
        pipeline = run.metadata.labels.get("flashops.dev/pipeline")
        return lineage.start_run(run.metadata.name, "TrainingRun", run.spec.stage, run.spec.to_dict(), run.spec_hash(),
                                 consumed=[ds], initialized_from=self.init_uri, pipeline=pipeline)


def _fail(field: str, value, fix: str):
    raise SpecValueError(f"spec.{field} = {value!r}: {fix}")


def resolve_checkpoint(ref: str, store, lineage, field: str) -> str:
    """A checkpoint URI for `ref` (a URI, a run/pipeline name or lineage:<id>; flashops.api.references, the
    resolver the operator and the serving loader use too), checked to exist."""
    from flashops.api.references import UnresolvedReference, is_uri, resolve_reference
    from flashops.storage import StoreError, open_store, split_checkpoint_uri

    def latest(run_name: str) -> str | None:
        found = store.latest(run_name) if store is not None else None
        return found.uri if found is not None else None

    try:
        art = resolve_reference(ref, lineage=lineage, latest_checkpoint=latest)
    except UnresolvedReference as e:
        raise DataError(f"spec.{field} = {ref!r}: no checkpoint found for it: {e}") from e
    if not art.checkpoint_uri:
        raise DataError(f"spec.{field} = {ref!r}: that is a serving export ({art.model_uri}), not a checkpoint; "
                        "give the checkpoint it was exported from (flashops lineage show) or a run name")
    if is_uri(ref):
        try:
            root, _, _ = split_checkpoint_uri(art.checkpoint_uri)
            open_store(root).meta(art.checkpoint_uri)
        except StoreError as e:
            raise DataError(f"spec.{field} = {ref!r}: no complete checkpoint there ({e}); "
                            "check the URI (flashops checkpoints list)") from e
    return art.checkpoint_uri


def model_config_of(run: TrainingRun):
    """The JoyAIConfig a run trains: its preset with its overrides (snake_case or camelCase), through the same
    validator as flashops validate and the operator (flashops.api.architecture)."""
    from flashops.api.architecture import ConfigError, get_config

    try:
        return get_config(run.spec.model.preset, run.spec.model.overrides)
    except ConfigError as e:
        raise SpecValueError(f"spec.model.overrides: {e}") from e


def preflight(run: TrainingRun, store=None, lineage=None, *, check_init: bool = True) -> Plan:
    """check_init=False: a pipeline stage whose initFrom is the previous stage's (not yet trained) output."""
    import torch

    from flashops.api.loader import model_fit_problems
    from flashops.model.tokenizer import load_tokenizer

    spec = run.spec
    tr = spec.training
    cfg = model_config_of(run)
    for field, value, fix in model_fit_problems(spec, cfg):  # the checks flashops validate makes too
        _fail(field, value, fix)
    vocab = load_tokenizer().get_vocab_size()
    if cfg.vocab_size < vocab:  # TOKENIZER_VOCAB_SIZE above is pinned to it; this guards a swapped tokenizer
        _fail("model.overrides.vocabSize", cfg.vocab_size, f"the tokenizer has {vocab} tokens; use vocabSize >= {vocab}")
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
    if tr.dtype == "bfloat16" or (tr.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    data_uri = spec.data_uri
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
    from flashops.api.architecture import RUN_TIME_FIELDS
    from flashops.storage import open_store, split_checkpoint_uri

    root, _, _ = split_checkpoint_uri(uri)
    meta = open_store(root).meta(uri)
    theirs = meta.model_config or {}
    ours = cfg.to_dict()
    diff = sorted(k for k in ours if k in theirs and theirs[k] != ours[k] and k not in RUN_TIME_FIELDS)
    if diff:
        raise SpecValueError(f"spec.initFrom = {uri!r}: its model differs in {', '.join(diff)} "
                             f"(checkpoint {[theirs[k] for k in diff]} vs spec {[ours[k] for k in diff]}); "
                             "set spec.model to the checkpoint's preset and overrides")
