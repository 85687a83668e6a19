"""The training engine: one loop for the four stages, checkpoints through the store, exact resume.

    from flashops.api.spec import load_file
    from flashops.trainers.engine import Trainer
    trainer = Trainer(load_file("examples/sft.yaml")[0], store=open_store(None))
    trainer.preflight()     # every check that needs no compute: spec values, data, init checkpoint
    result = trainer.fit()  # resumes from the run's latest complete checkpoint if there is one

A stage (stages.py, rl.py) turns a step into micro-batches and a loss; the engine owns the rest: seeds,
the model (+ QAT, + FSDP2/EP when launched with several processes), optimizers and the lr schedule,
gradient accumulation and clipping, router-bias updates, metrics, checkpoints. A checkpoint holds the
model (incl. router biases), the optimizer state, the step, the data position (the stage's cursor),
the RNG state and any stage state (the RL curriculum's pass rates), so a killed run continues exactly.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flashops.api.spec import TrainingRun
from flashops.trainers import checks
from flashops.trainers.cpu_allocator import keep_freed_memory
from flashops.trainers.errors import DivergedError, ResumeError
from flashops.trainers.metrics import MetricsLog
from flashops.trainers.optim import build_optimizers, set_lr
from flashops.trainers.schedules import lr_at

log = logging.getLogger("flashops.trainers")
METRICS_EVERY = 10  # steps per lineage metrics report (one small write; the 48B preset steps take seconds)
METRICS_BUFFER = 10_000  # rows kept while lineage is unreachable


@dataclass
class RunResult:
    run: str
    stage: str
    steps: int
    checkpoint_uri: str | None
    metrics: dict = field(default_factory=dict)  # the final step's metrics (+ stage summaries, e.g. RL eval)
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0
    device: str = "cpu"  # where the steps ran: "cuda" where torch sees a GPU (docs/scale.md)


class Trainer:
    def __init__(self, run: TrainingRun, *, store=None, on_step: Callable[[dict], None] | None = None,
                 log_dir: str | Path | None = None, tensorboard_dir: str | Path | None = None,
                 crash_after: int | None = None, lineage=None,
                 on_progress: Callable[[str, int, int], None] | None = None):
        self.run = run
        self.spec = run.spec
        self.name = run.metadata.name
        from flashops.api.lineage import as_lineage

        self.store = store  # a flashops.storage.CheckpointStore (None: nothing is saved)
        self.lineage = as_lineage(lineage)  # a flashops.api.lineage.Lineage; NullLineage when off
        self.on_step = on_step
        self.on_progress = on_progress  # (phase, done, total) for work before the first step, e.g. profiling
        self.log_dir = Path(log_dir) if log_dir else None
        self.tensorboard_dir = tensorboard_dir
        self.crash_after = crash_after  # tests: raise after this step, like a killed process
        self.plan: checks.Plan | None = None
        self.step = 0
        self.opt_step = 0

    # ------------------------------------------------------------------ before any compute
    def preflight(self) -> checks.Plan:
        """Validate everything that can be validated without building the model; raises SpecValueError,
        DataError or ResumeError naming the field, the value and the fix."""
        if self.plan is None:
            self.plan = checks.preflight(self.run, self.store, self.lineage)
        return self.plan

    @property
    def total_opt_steps(self) -> int:
        return self.spec.training.steps * self.plan.updates_per_step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from flashops.trainers import parallel
        from flashops.trainers.registry import make_stage

        plan = self.preflight()
        if not torch.cuda.is_available():
            keep_freed_memory()  # CPU training: no per-step page faults for the same buffers
        self.dist = parallel.init_distributed(self.spec.parallelism)
        torch.manual_seed(self.spec.training.seed)
        self.dtype = plan.dtype
        # post-training on several processes: built on the meta device, sharded, then each rank reads only its
        # shards of the starting checkpoint, so no process holds the whole model (the 48B preset: 196 GB in fp32)
        self.loads_sharded = self.dist.world_size > 1 and plan.init_uri is not None
        if self.loads_sharded:
            self.model = self.sharded_model(plan.init_uri, train=True)
            self.stage = make_stage(self)  # a frozen reference is built sharded too (frozen_reference)
            parallel.reshard(self.model)  # the stage may have run a forward (RL's first evaluation)
        else:
            self.model = parallel.build_model(plan.model_config, self.dist, self.spec.parallelism)
            self.enable_qat(self.model)
            if plan.init_uri:
                self.load_weights(self.model, plan.init_uri)
            # on the process's device before the stage copies it as a frozen reference (FSDP2 shards from there)
            self.model.to(self.dist.device)
            self.stage = make_stage(self)  # may copy the model as a frozen reference (dpo, rl with KL)
            self.model = self.parallelize(self.model, train=True)
        self.model.train()
        self.optimizers = build_optimizers(self.model, self.spec.optimizer)
        self.metrics = MetricsLog(self.log_dir / "metrics.jsonl" if self.log_dir else None, self.tensorboard_dir,
                                  self._on_step, enabled=self.dist.rank == 0)
        if self.store is not None:  # every rank: the async mode creates its process groups here
            from flashops.storage.checkpointer import Checkpointer

            self.checkpointer = Checkpointer(self.store, self.spec.checkpoint.mode)

    def progress(self, phase: str, done: int, total: int) -> None:
        """Report progress of a stage's work outside the steps (rank 0 only; a no-op without a listener)."""
        if self.on_progress and self.dist.rank == 0:
            self.on_progress(phase, done, total)

    def _on_step(self, row: dict) -> None:
        if self.on_step:
            self.on_step(row)

    def load_weights(self, model, uri: str) -> None:
        """Initialise from a checkpoint (another run's): model weights and router biases only. A sharded model
        reads only its own shards (DCP reshards to this world size and layout)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        from flashops.storage import load_checkpoint

        state = {"model": get_model_state_dict(model)}
        load_checkpoint(uri, state)
        set_model_state_dict(model, state["model"])

    def enable_qat(self, model) -> None:
        if self.spec.qat.mode == "int4":
            from flashops.model.qat import enable_qat

            enable_qat(model, self.spec.qat.group_size)

    def parallelize(self, model, train: bool):
        """Activation checkpointing and compile (a trained model only), then FSDP2 (+ EP) with several processes.
        Parameters and optimizer state stay fp32 (checkpoints too); compute runs in self.dtype: through FSDP2's
        MixedPrecisionPolicy with several processes, through autocast in one (compute_precision)."""
        from flashops.trainers import parallel

        if train:
            parallel.apply_activation_checkpointing(model, self.spec.training.activation_checkpointing)
            parallel.apply_compile(model, self.spec.training.compile, self.dist.device)
        return parallel.parallelize(model, self.dist, self.spec.parallelism, compute_dtype=self.dtype,
                                    qat=self.spec.qat.mode == "int4")

    def sharded_model(self, uri: str, train: bool):
        """The model built on the meta device, sharded (FSDP2 + EP), given this rank's storage on its device and
        loaded from `uri`: the process never holds more than its shards (torchtitan builds on meta the same way)."""
        from flashops.trainers import parallel

        with torch.device("meta"):
            model = parallel.build_model(self.plan.model_config, self.dist, self.spec.parallelism)
        self.enable_qat(model)
        model = self.parallelize(model, train=train)
        model.to_empty(device=self.dist.device)
        with torch.no_grad():  # the buffers (RoPE tables, router state); the load then sets every parameter
            model.init_states()
        self.load_weights(model, uri)
        return model

    def frozen_reference(self, uri: str | None = None):
        """A stage's frozen reference policy (DPO, RL's KL): the run's starting checkpoint, or `uri`. Sharded like
        the policy when the policy was loaded sharded; else a copy of the policy before it is parallelized."""
        uri = uri or self.plan.init_uri
        if self.loads_sharded:
            ref = self.sharded_model(uri, train=False)
        else:
            ref = copy.deepcopy(self.model)
            if uri and uri != self.plan.init_uri:
                self.load_weights(ref, uri)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.dist.world_size > 1:
            from flashops.trainers.parallel import reshard

            reshard(self.model)  # the state of the shards, whatever forward ran last
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "trainer": {
                "step": torch.tensor(self.step), "opt_step": torch.tensor(self.opt_step),
                "rng": torch.get_rng_state(), **self.stage.state_dict(),
            },
        }

    def save(self, final: bool = False):
        meta = {
            "model_config": self.plan.model_config.to_dict(), "spec_hash": self.run.spec_hash(),
            "parent": self.plan.init_uri, "stage": self.spec.stage, "dataset": self.plan.data_uri,
            "metrics": self.metrics.history[-1] if self.metrics.history else {}, "final": final,
            "qat": self.spec.qat.mode,
            # the INT4 group size QAT trained with: export must round with the same groups (else the served
            # INT4 logits drift from the QAT ones)
            "qat_group_size": self.spec.qat.group_size if self.spec.qat.mode == "int4" else None,
        }
        self._report_metrics(None, flush=True)
        # async (checkpoint.mode): returns once the state is staged; _saved runs when the upload is complete
        return self.checkpointer.save(self.name, self.step, self._state(), meta, overwrite=final, blocking=final,
                                      on_saved=lambda ref, step=self.step: self._saved(ref, step, meta))

    def _saved(self, ref, step: int, meta: dict) -> None:
        if self.dist.rank == 0 and self.lineage and self.lineage_run_id is not None:
            self.lineage.add_checkpoint(self.lineage_run_id, ref.uri, step, ref.manifest_hash, meta["metrics"])
        if self.spec.checkpoint.keep and self.dist.rank == 0:
            self.store.gc(self.name, self.spec.checkpoint.keep)

    def try_resume(self) -> int | None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        ref = self.store.latest(self.name) if self.store is not None else None
        if ref is None:
            return None
        meta = self.store.meta(ref)
        if meta.spec_hash and meta.spec_hash != self.run.spec_hash():
            raise ResumeError(
                f"run {self.name!r} already has checkpoints ({ref.uri}) from a different spec "
                f"({meta.spec_hash[:19]}... vs {self.run.spec_hash()[:19]}...): give the run a new "
                f"metadata.name, or delete its checkpoints (flashops checkpoints gc {self.name} ...) to start over")
        state = self._state()
        self.store.load_checkpoint(ref, state)
        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
        t = state["trainer"]
        self.step, self.opt_step = int(t["step"]), int(t["opt_step"])
        torch.set_rng_state(t["rng"])
        self.stage.load_state_dict(t)
        log.info("resumed %s from %s (step %d)", self.name, ref.uri, self.step)
        return self.step

    # ------------------------------------------------------------------ per-step metrics to lineage
    def _report_metrics(self, row: dict | None, flush: bool = False) -> None:
        """Send the per-step metrics (the dashboard's curves) to lineage in batches: every METRICS_EVERY steps,
        at each checkpoint and at the end. Curves are not artifacts: a lineage outage keeps the rows for the
        next try (up to METRICS_BUFFER) and never stops training."""
        if not self.lineage or getattr(self, "lineage_run_id", None) is None or self.dist.rank != 0:
            return
        pending = self.__dict__.setdefault("_metric_rows", [])
        if row is not None:
            pending.append({k: v for k, v in row.items()
                            if k == "step" or isinstance(v, (int, float)) and not isinstance(v, bool)})
        if not pending or not flush and len(pending) < METRICS_EVERY:
            return
        try:
            self.lineage.record_metrics(self.lineage_run_id, pending)
            pending.clear()
        except Exception as e:  # noqa: BLE001 - lineage down or slow: training goes on
            log.warning("could not report %d metric rows to lineage (kept for the next try): %s", len(pending), e)
            del pending[:-METRICS_BUFFER]

    # ------------------------------------------------------------------ the loop's pieces (used by stages)
    def all_sum(self, value: float) -> float:
        """Sum a per-rank metric over ranks (identity in one process)."""
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.dist.device)  # NCCL reduces device tensors
        torch.distributed.all_reduce(t)
        return float(t)

    def all_min(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return float(t)

    def compute_precision(self):
        """Context for the stage's forward passes: bf16 autocast over the fp32 weights in one process (FSDP2
        casts the gathered parameters itself, so nothing to do there), else a no-op."""
        import contextlib

        if self.dtype == torch.float32 or self.dist.world_size > 1:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.dist.device).type, dtype=self.dtype)

    def _full_precision(self):
        return torch.autocast(torch.device(self.dist.device).type, enabled=False)

    def backward(self, loss: torch.Tensor) -> None:
        with self._full_precision():  # backward ops follow their forward's dtypes; autocast covers forwards only
            loss.backward()

    def optimizer_step(self) -> dict:
        """Clip, step every optimizer at the scheduled lr, nudge router biases. Returns lr, grad norm, imbalance."""
        with self._full_precision():
            return self._optimizer_step()

    def _optimizer_step(self) -> dict:
        lr = lr_at(self.opt_step, self.total_opt_steps, self.spec.optimizer)
        set_lr(self.optimizers, lr, self.spec.optimizer.lr)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # every parameter gets optimizer state from step 1 (e.g. MTP before mtpFromStep),
            if p.grad is None:  # so a checkpoint always holds the full state and resume matches it key for key
                p.grad = torch.zeros_like(p)
        clip = self.spec.optimizer.grad_clip or float("inf")
        if self.dist.world_size > 1:  # torchtitan's clip knows FSDP and EP meshes (experts norm separately)
            from torchtitan.distributed.utils import clip_grad_norm_

            grad_norm = clip_grad_norm_(params, clip, foreach=False, ep_enabled=self.spec.parallelism.ep > 1)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if not math.isfinite(float(grad_norm)):  # every rank sees the same (all-reduced) norm: all stop together
            raise self.diverged("gradient norm", float(grad_norm), self.step + 1)
        for o in self.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        load = self.model.update_router_bias().float()
        imbalance = (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean().item() if load.numel() else 1.0
        self.opt_step += 1
        return {"lr": lr, "grad_norm": float(grad_norm), "expert_imbalance": imbalance}

    def diverged(self, what: str, value: float, step: int) -> DivergedError:
        """The error that stops a diverged run (a NaN/inf loss or gradient norm) before anything is saved."""
        if self.store is not None:  # a save still in flight holds a step before the divergence: finish it first,
            self.checkpointer.close()  # so the message names it (it raced the message on a fast CI machine)
        try:
            saved = self.store.latest(self.name) if self.store is not None else None
        except Exception:  # noqa: BLE001 - the divergence is the news; the store is only context
            saved = None
        return DivergedError(
            f"run {self.name!r} diverged at step {step}: the {what} is {value}; the run stops with no checkpoint "
            f"after step {saved.step if saved else 0} ({'last saved: ' + saved.uri if saved else 'none saved'}). "
            f"Fix: lower spec.optimizer.lr (now {self.spec.optimizer.lr:g}), keep spec.optimizer.gradClip on "
            f"(now {self.spec.optimizer.grad_clip:g}), or add warmupSteps", step)

    # ------------------------------------------------------------------ fit
    def fit(self) -> RunResult:
        t0 = time.time()
        self.setup()
        self.lineage_run_id = None
        resumed = self.try_resume()
        if self.lineage and self.dist.rank == 0:
            # the operator starts the lineage run itself and hands its id to the pod
            given = os.environ.get("FLASHOPS_LINEAGE_RUN_ID")
            self.lineage_run_id = int(given) if given else self.plan.start_lineage(self.lineage, self.run)
        total = self.spec.training.steps
        every = self.spec.checkpoint.every
        last_ref = None
        try:
            self.stage.on_start()
            while self.step < total:
                if self.store is not None:
                    self.checkpointer.poll()  # a finished background save is recorded, or its error raised
                t_step = time.time()
                with self.compute_precision():
                    stats = self.stage.train_step(self.step)
                loss = stats.get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    raise self.diverged("loss", loss, self.step + 1)
                self.step += 1
                seconds = time.time() - t_step
                tokens = stats.pop("tokens", 0)
                row = self.metrics.write(self.step, **stats, tokens_per_s=tokens / max(seconds, 1e-9),
                                         step_seconds=seconds, total_steps=total)
                self._report_metrics(row)
                if self.step % every == 0 and self.step < total and self.store is not None:
                    self.save()
                if self.crash_after is not None and self.step >= self.crash_after:
                    raise RuntimeError(f"crash_after={self.crash_after}: simulated crash")
            if self.store is not None:
                self.checkpointer.wait()
                existing = self.store.latest(self.name)
                last_ref = existing if existing is not None and existing.step == total else self.save(final=True)
            summary = self.stage.on_end()
        except BaseException as e:
            if self.store is not None:
                self.checkpointer.close()  # a save in flight completes (and is recorded) before the run is failed
            self._report_metrics(None, flush=True)  # the curve up to the failure is what explains it
            if self.lineage and self.lineage_run_id is not None:
                try:  # the reason goes with it: the dashboard shows why the stage failed
                    self.lineage.finish_run(self.lineage_run_id, "failed", {
                        "step": self.step, "reason": type(e).__name__, "message": str(e)[:500],
                        **({"diverged_at_step": e.step} if isinstance(e, DivergedError) else {})})
                except Exception:  # the original error matters more
                    log.exception("could not record the failed run in lineage")
            raise
        finally:
            if self.store is not None:
                self.checkpointer.close()
            self.metrics.close()
        self._report_metrics(None, flush=True)
        final = dict(self.metrics.history[-1]) if self.metrics.history else {}
        final.update(summary or {})
        if self.lineage and self.lineage_run_id is not None:
            self.lineage.finish_run(self.lineage_run_id, "succeeded", _jsonable(final))
        return RunResult(self.name, self.spec.stage, self.step, last_ref.uri if last_ref else None, final,
                         list(self.metrics.history), resumed, time.time() - t0, self.dist.device)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, dict)) or v is None}
