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

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flashops.api.spec import TrainingRun
from flashops.trainers import checks
from flashops.trainers.cpu_allocator import keep_freed_memory
from flashops.trainers.errors import ResumeError
from flashops.trainers.metrics import MetricsLog
from flashops.trainers.optim import build_optimizers, set_lr
from flashops.trainers.schedules import lr_at

log = logging.getLogger("flashops.trainers")


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


class Trainer:
    def __init__(self, run: TrainingRun, *, store=None, on_step: Callable[[dict], None] | None = None,
                 log_dir: str | Path | None = None, tensorboard_dir: str | Path | None = None,
                 crash_after: int | None = None, lineage=None):
        self.run = run
        self.spec = run.spec
        self.name = run.metadata.name
        self.store = store
        self.lineage = lineage
        self.on_step = on_step
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
        from flashops.trainers.stages import make_stage

        plan = self.preflight()
        if not torch.cuda.is_available():
            keep_freed_memory()  # CPU training: no per-step page faults for the same buffers
        self.dist = parallel.init_distributed(self.spec.parallelism)
        torch.manual_seed(self.spec.training.seed)
        self.dtype = plan.dtype
        self.model = parallel.build_model(plan.model_config, self.dist, self.spec.parallelism)
        if self.spec.qat.mode == "int4":
            from flashops.model.qat import enable_qat

            enable_qat(self.model, self.spec.qat.group_size)
        if plan.init_uri:
            self.load_weights(self.model, plan.init_uri)
        self.stage = make_stage(self)  # may copy the model as a frozen reference (dpo, rl with KL)
        self.model = parallel.parallelize(self.model, self.dist, self.spec.parallelism)
        if self.dtype != torch.float32:
            self.model.to(self.dtype)
        self.model.train()
        self.optimizers = build_optimizers(self.model, self.spec.optimizer)
        self.metrics = MetricsLog(self.log_dir / "metrics.jsonl" if self.log_dir else None, self.tensorboard_dir,
                                  self._on_step, enabled=self.dist.rank == 0)

    def _on_step(self, row: dict) -> None:
        if self.on_step:
            self.on_step(row)

    def load_weights(self, model, uri: str) -> None:
        """Initialise from a checkpoint (another run's): model weights and router biases only."""
        from flashops.storage import load_checkpoint

        state = {"model": model.state_dict()}
        load_checkpoint(uri, state)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

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
        }
        ref = self.store.save_checkpoint(self.name, self.step, self._state(), meta, overwrite=final)
        if self.dist.rank == 0 and self.lineage is not None and self.lineage_run_id is not None:
            self.lineage.add_checkpoint(self.lineage_run_id, ref.uri, self.step, ref.manifest_hash, meta["metrics"])
        if self.spec.checkpoint.keep and self.dist.rank == 0:
            self.store.gc(self.name, self.spec.checkpoint.keep)
        return ref

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

    # ------------------------------------------------------------------ the loop's pieces (used by stages)
    def all_sum(self, value: float) -> float:
        """Sum a per-rank metric over ranks (identity in one process)."""
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t)

    def all_min(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return float(t)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> dict:
        """Clip, step every optimizer at the scheduled lr, nudge router biases. Returns lr, grad norm, imbalance."""
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
        for o in self.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        load = self.model.update_router_bias().float()
        imbalance = (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean().item() if load.numel() else 1.0
        self.opt_step += 1
        return {"lr": lr, "grad_norm": float(grad_norm), "expert_imbalance": imbalance}

    # ------------------------------------------------------------------ fit
    def fit(self) -> RunResult:
        t0 = time.time()
        self.setup()
        self.lineage_run_id = None
        resumed = self.try_resume()
        if self.lineage is not None and self.dist.rank == 0:
            # the operator starts the lineage run itself and hands its id to the pod
            given = os.environ.get("FLASHOPS_LINEAGE_RUN_ID")
            self.lineage_run_id = int(given) if given else self.plan.start_lineage(self.lineage, self.run)
        total = self.spec.training.steps
        every = self.spec.checkpoint.every
        last_ref = None
        try:
            self.stage.on_start()
            while self.step < total:
                t_step = time.time()
                stats = self.stage.train_step(self.step)
                self.step += 1
                seconds = time.time() - t_step
                tokens = stats.pop("tokens", 0)
                row = self.metrics.write(self.step, **stats, tokens_per_s=tokens / max(seconds, 1e-9),
                                         step_seconds=seconds, total_steps=total)
                if self.step % every == 0 and self.step < total and self.store is not None:
                    last_ref = self.save()
                if self.crash_after is not None and self.step >= self.crash_after:
                    raise RuntimeError(f"crash_after={self.crash_after}: simulated crash")
            if self.store is not None:
                existing = self.store.latest(self.name)
                last_ref = existing if existing is not None and existing.step == total else self.save(final=True)
            summary = self.stage.on_end()
        except BaseException:
            if self.lineage is not None and self.lineage_run_id is not None:
                try:
                    self.lineage.finish_run(self.lineage_run_id, "failed", {"step": self.step})
                except Exception:  # the original error matters more
                    log.exception("could not record the failed run in lineage")
            raise
        finally:
            self.metrics.close()
        final = dict(self.metrics.history[-1]) if self.metrics.history else {}
        final.update(summary or {})
        if self.lineage is not None and self.lineage_run_id is not None:
            self.lineage.finish_run(self.lineage_run_id, "succeeded", _jsonable(final))
        return RunResult(self.name, self.spec.stage, self.step, last_ref.uri if last_ref else None, final,
                         list(self.metrics.history), resumed, time.time() - t0)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, dict)) or v is None}
