"""Saving checkpoints while training goes on (`checkpoint.mode: async`, the default) or in line (`sync`).

    saver = Checkpointer(store, "async")               # every rank, once (creates the save's process groups)
    saver.save(run, step, state, meta, on_saved=fn)    # async: returns once the state is copied to host memory
    saver.poll()                                       # every step, every rank: fn(ref) for a finished save,
                                                       # or that save's error, raised on every rank
    saver.wait()                                       # before the final save and before reading `latest`

Async, step by step:
1. Stage. Every tensor of the state (a DTensor's local shard) is copied into a host staging buffer: one
   buffer per tensor, allocated at the first save and reused by every later one, so host memory holds at
   most ONE extra copy of this rank's state (at most one save is in flight). This copy is all the time
   training is blocked.
2. Upload in the background: the same `CheckpointStore.save_checkpoint` the synchronous mode runs (shards
   streamed up while hashed, rank 0 writes the manifest LAST, after every rank's shards), in one worker
   thread per rank. Its collectives run in a gloo process group of their own, so they never interleave
   with the training's collectives.
3. The next save waits for the previous one first, and says how long it waited (raise `checkpoint.every`
   if that happens often).
4. `poll()` runs at every step. In a distributed run the ranks agree (one tiny all-reduce in a second
   group, only while a save is in flight) on whether the save has finished everywhere, so they all see it
   at the same step: `on_saved(ref)` runs, or the background error is raised on every rank as the same
   typed StoreError (CredentialsError, CorruptObjectError, ...) the synchronous path raises.
A process killed in between leaves a checkpoint without manifest: `latest()` skips it, resume uses the
previous complete one.
"""
from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as dist

from flashops.storage import dcp
from flashops.storage.store import CheckpointRef, CheckpointStore

log = logging.getLogger(__name__)
Mode = Literal["sync", "async"]


@dataclass
class SaveStats:
    """What the last save cost training (seconds) and the staging buffer's size (bytes, this rank)."""

    blocked_s: float = 0.0     # the save() call: staging copy (async) or the whole save (sync)
    waited_s: float = 0.0      # part of blocked_s spent waiting for the previous save
    upload_s: float = 0.0      # the background save, staging excluded (async)
    staging_bytes: int = 0
    saves: int = 0
    waits: int = 0             # saves that had to wait for the previous one


class StagingBuffer:
    """Host copies of a state dict's tensors, reused between saves (bounded: one copy of the state)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def stage(self, state) -> object:
        """A copy of `state` whose tensors live in the reused buffers (DTensors keep their mesh/placements)."""
        used: dict[str, torch.Tensor] = {}
        cuda = [False]
        with torch.no_grad():
            staged = self._copy(state, "", used, cuda)
        if cuda[0]:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before the upload
        self._buffers = used  # buffers of tensors that are gone are dropped: never more than one state
        self.nbytes = sum(b.numel() * b.element_size() for b in used.values())
        return staged

    def _copy(self, value, path: str, used: dict, cuda: list):
        from torch.distributed.tensor import DTensor

        if isinstance(value, dict):
            return {k: self._copy(v, f"{path}/{k}", used, cuda) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, f"{path}/{i}", used, cuda) for i, v in enumerate(value)]
            return type(value)(items) if isinstance(value, list) else tuple(items)
        if isinstance(value, DTensor):
            local = self._tensor(value.to_local(), path, used, cuda)
            return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                      shape=value.shape, stride=value.stride())
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, used, cuda)
        return copy.deepcopy(value)  # ints, floats, strings (step counters, optimizer hyper-parameters)

    def _tensor(self, t: torch.Tensor, path: str, used: dict, cuda: list) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        cuda[0] |= t.is_cuda
        used[path] = buf
        return buf


class Checkpointer:
    def __init__(self, store: CheckpointStore, mode: Mode = "async"):
        if mode not in ("sync", "async"):
            raise ValueError(f"checkpoint.mode={mode!r}: use 'async' (default) or 'sync'")
        self.store = store
        self.stats = SaveStats()
        self._save_group = self._poll_group = None
        if mode == "async" and dcp.rank_and_world()[1] > 1:
            if not dist.is_gloo_available():
                log.warning("checkpoint.mode=async needs a gloo process group for the background save's "
                            "collectives and this torch has no gloo: saving synchronously")
                mode = "sync"
            else:  # every rank creates them, in the same order
                self._save_group = dist.new_group(backend="gloo")
                self._poll_group = dist.new_group(backend="gloo")
        self.mode: Mode = mode
        self._staging = StagingBuffer()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-save") if mode == "async" else None
        self._pending: tuple[Future, int, Callable | None] | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def save(self, run: str, step: int, state_dict, meta=None, *, overwrite: bool = False, blocking: bool = False,
             on_saved: Callable[[CheckpointRef], None] | None = None) -> CheckpointRef | None:
        """Save `state_dict` as run/step. Sync (or blocking=True): returns the ref once the checkpoint is
        complete. Async: returns None once the state is staged; `on_saved(ref)` runs from poll()/wait()."""
        t0 = time.perf_counter()
        waited = 0.0
        if self._pending is not None:
            previous = self._pending[1]
            self._finish(block=True)
            waited = time.perf_counter() - t0
            self.stats.waits += 1
            log.warning("checkpoint step-%d waited %.2fs for the background save of step-%d to finish "
                        "(saves overlap: raise checkpoint.every, or the store is slower than training)",
                        step, waited, previous)
        if self.mode == "sync" or blocking:
            ref = self.store.save_checkpoint(run, step, state_dict, meta, overwrite=overwrite,
                                             process_group=self._save_group)
            self._record(t0, waited, upload_s=0.0)
            if on_saved is not None:
                on_saved(ref)
            return ref
        staged = self._staging.stage(state_dict)
        staged_at = time.perf_counter()

        def upload() -> CheckpointRef:
            ref = self.store.save_checkpoint(run, step, staged, meta, overwrite=overwrite,
                                             process_group=self._save_group)
            self.stats.upload_s = time.perf_counter() - staged_at
            return ref

        self._pending = (self._worker.submit(upload), step, on_saved)
        self._record(t0, waited, staging_bytes=self._staging.nbytes)
        log.info("checkpoint step-%d staged in %.3fs (%.0f MB of host memory); uploading in the background",
                 step, staged_at - t0, self._staging.nbytes / 1e6)
        return None

    def _record(self, t0: float, waited: float, **more) -> None:
        self.stats.blocked_s, self.stats.waited_s = time.perf_counter() - t0, waited
        self.stats.saves += 1
        for k, v in more.items():
            setattr(self.stats, k, v)

    def poll(self) -> CheckpointRef | None:
        """Call at every step on every rank. Returns the ref of a save that finished (after on_saved), raises
        a background save's error (on every rank, at the same step), or returns None (nothing finished)."""
        if self._pending is None:
            return None
        done = self._pending[0].done()
        if self._poll_group is not None:  # finished only when finished on every rank
            flag = torch.tensor([1 if done else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._poll_group)
            done = bool(flag.item())
        return self._finish(block=False) if done else None

    def wait(self) -> CheckpointRef | None:
        """Block until the save in flight (if any) is complete; on_saved runs, or its error is raised."""
        return self._finish(block=True) if self._pending is not None else None

    def close(self) -> None:
        """Finish the save in flight, logging (not raising) its error: for paths already failing."""
        try:
            self.wait()
        except Exception:
            log.exception("the background checkpoint save failed")
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _finish(self, block: bool) -> CheckpointRef:
        future, step, on_saved = self._pending
        self._pending = None
        try:
            ref = future.result()  # every rank gets the same outcome: the save's own collectives agree on it
        except Exception as e:
            e.add_note(f"(raised by the background save of checkpoint step-{step}, checkpoint.mode: async; the "
                       "previous complete checkpoint is still the latest)")
            raise
        if on_saved is not None:
            on_saved(ref)
        return ref

