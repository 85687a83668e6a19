"""Child process for the multi-process storage tests (not a test module itself).

    python tests/storage/dist_worker.py reshard STORE_URI SAVE_WORLD LOAD_WORLD
    python tests/storage/dist_worker.py slow-save STORE_URI
    python tests/storage/dist_worker.py async-train STORE_URI
    python tests/storage/dist_worker.py async-fail STORE_URI WORLD

reshard: forks SAVE_WORLD ranks that save (gloo), then LOAD_WORLD ranks that load (forking after the
imports keeps this to one interpreter start on a 2-core machine); "experts" is a DTensor of shape [NUM_EXPERTS, 4, 2] sharded on
dim 0 whose every value encodes where it belongs (expert*100 + row*10 + col), like an expert-parallel MoE
weight; load checks that each rank received exactly the experts DTensor assigns to it.
slow-save: saves step 1 (small), then step 2 (large, many shards) so the parent can SIGKILL it mid-save.
async-train: checkpoint.mode async: step 1 saved and complete, then step 2 staged while its upload is held
back, and "training" goes on changing the weights (prints each step) until the parent SIGKILLs it.
async-fail: WORLD ranks (gloo) save step 1 asynchronously, then step 2 while rank 1's uploads fail with
CredentialsError; every rank trains on (an all-reduce per step, like a real step), polls, and prints the
step and the error type at which its poll raised.
"""
import sys

import torch
import torch.distributed as dist

NUM_EXPERTS = 8


def expected_experts() -> torch.Tensor:
    e = torch.arange(NUM_EXPERTS).view(-1, 1, 1) * 100
    r = torch.arange(4).view(1, -1, 1) * 10
    c = torch.arange(2).view(1, 1, -1)
    return (e + r + c).float()


def state(mesh, fill: bool):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    experts = expected_experts() if fill else torch.zeros(NUM_EXPERTS, 4, 2)
    bias = torch.arange(NUM_EXPERTS).float() if fill else torch.zeros(NUM_EXPERTS)
    dense = torch.full((3, 3), 7.0) if fill else torch.zeros(3, 3)
    return {
        "layers.1.moe.experts.w1": distribute_tensor(experts, mesh, [Shard(0)]),
        "layers.1.moe.router.expert_bias": distribute_tensor(bias, mesh, [Shard(0)]),
        "layers.0.ffn.w": distribute_tensor(dense, mesh, [Replicate()]),
    }


def _hold_back_commits_after_the_first() -> None:
    """Make "mid-save" certain on a fast disk: the first shard of step 2 commits at once, every later
    one waits 5 s, so the parent's SIGKILL (sent when it sees the first) always lands in the middle."""
    import threading
    import time

    from flashops.storage import backends

    original, lock, first = backends.HashingWriter.commit, threading.Lock(), []

    def commit(self):
        with lock:
            later = bool(first)
            first.append(True)
        if later:
            time.sleep(5)
        return original(self)

    backends.HashingWriter.commit = commit


def train_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {f"layer{i}": torch.randn(1024 * 1024, generator=g) for i in range(8)},  # 8 x 4 MB
            "trainer": {"step": torch.tensor(seed)}}


def async_train(uri: str) -> None:
    """The weights of step 1 are train_state(1); the parent checks a resume loads exactly those."""
    from flashops.storage import open_store
    from flashops.storage.checkpointer import Checkpointer

    saver = Checkpointer(open_store(uri), "async")
    state = train_state(1)
    saver.save("async-crash", 1, state)
    saver.wait()
    _hold_back_commits_after_the_first()
    for t in state["model"].values():
        t.add_(1.0)  # step 2's weights
    state["trainer"]["step"].fill_(2)
    saver.save("async-crash", 2, state)
    print("staged step 2", flush=True)
    step = 2
    while True:  # training goes on while step 2 uploads, until the parent kills us
        step += 1
        for t in state["model"].values():
            t.mul_(0.999)
        saver.poll()
        print(f"trained step {step}", flush=True)


def main() -> None:
    mode, uri = sys.argv[1], sys.argv[2]
    from flashops.storage import open_store

    if mode == "async-train":
        async_train(uri)
        return
    if mode == "async-fail":
        if not run_ranks("async-fail", uri, int(sys.argv[3])):
            sys.exit(1)
        return
    store = open_store(uri)
    if mode == "slow-save":
        store.save_checkpoint("crash", 1, {"w": torch.ones(1024)})
        _hold_back_commits_after_the_first()
        big = {f"layer{i}": torch.randn(2 * 1024 * 1024) for i in range(24)}  # 24 x 8 MB
        print("saving step 2", flush=True)
        store.save_checkpoint("crash", 2, big, thread_count=8)
        print("step 2 saved", flush=True)
        return

    save_world, load_world = int(sys.argv[3]), int(sys.argv[4])
    for phase, world in (("save", save_world), ("load", load_world)):
        if not run_ranks(phase, uri, world):
            sys.exit(1)


def run_ranks(mode: str, uri: str, world: int) -> bool:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(mode, uri, r, world, port)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    ok = all(p.exitcode == 0 for p in procs)
    if not ok:
        print(f"{mode} at world size {world} failed: exit codes {[p.exitcode for p in procs]}", flush=True)
    return ok


def rank_main(mode: str, uri: str, rank: int, world: int, port: int) -> None:
    from flashops.storage import open_store

    store = open_store(uri)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    try:
        if mode == "async-fail":
            async_fail(store, mesh, rank)
            return
        if mode == "save":
            ref = store.save_checkpoint("ep", 1, state(mesh, fill=True), {"world": world})
            print(f"rank {rank} saved {ref.uri}", flush=True)
        elif mode == "load":
            sd = state(mesh, fill=False)
            meta = store.load_checkpoint(store.latest("ep"), sd)
            local = sd["layers.1.moe.experts.w1"].to_local()
            # torch.chunk semantics: ceil(E / world) experts per rank, the last rank gets the rest.
            per_rank = -(-NUM_EXPERTS // world)
            first = rank * per_rank
            ids = list(range(first, min(first + per_rank, NUM_EXPERTS)))
            got_ids = (local[:, 0, 0] // 100).int().tolist()
            assert got_ids == ids, f"rank {rank}: holds experts {got_ids}, expected {ids}"
            assert torch.equal(local, expected_experts()[ids]), f"rank {rank}: expert weights landed wrong"
            assert sd["layers.1.moe.router.expert_bias"].to_local().tolist() == [float(i) for i in ids]
            assert torch.equal(sd["layers.0.ffn.w"].to_local(), torch.full((3, 3), 7.0))
            print(f"rank {rank} of {world} holds experts {got_ids} (saved at world size {meta.world_size})",
                  flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def async_fail(store, mesh, rank: int) -> None:
    from flashops.storage import CredentialsError, StoreError, backends
    from flashops.storage.checkpointer import Checkpointer

    saver = Checkpointer(store, "async")
    sharded = state(mesh, fill=True)  # sharded: every rank writes shard files of its own
    saver.save("async-fail", 1, sharded)
    saver.wait()
    if rank == 1:
        def commit(self):
            raise CredentialsError("simulated: the S3 endpoint rejected rank 1's credentials")

        backends.HashingWriter.commit = commit
    saver.save("async-fail", 2, sharded)
    for step in range(3, 400):
        t = torch.ones(1)
        dist.all_reduce(t)  # the training step's collective: every rank must still be in step
        try:
            saver.poll()
        except StoreError as e:
            print(f"rank {rank} raised {type(e).__name__} at step {step}: {str(e).splitlines()[0][:120]}",
                  flush=True)
            return
    print(f"rank {rank} never raised", flush=True)


if __name__ == "__main__":
    main()
