"""Checkpoint save/load throughput: the real S3 server (seaweedfs `weed mini`, started here) vs local
disk, same state dict, same code path (flashops.storage save_checkpoint / load_checkpoint with sha256
verification), same run. Target: S3 >= 0.5x local disk.

    .venv/bin/python benchmarks/checkpoint_io.py            # 500 MB state dict
    .venv/bin/python benchmarks/checkpoint_io.py --mb 100 --repeats 1

Disk saves are fsynced (a checkpoint must survive a crash); reads of either backend may come from the
page cache, since both were just written. Parallelism: DCP writes `thread_count` shard files per rank at
once; each S3 object goes up in `parallelism` concurrent multipart parts of `part_size` and comes down
in as many concurrent ranged GETs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_state(total_mb: int):
    import torch

    # Model-like: a few big matrices (embeddings, experts) and many medium ones.
    n = 40
    per = total_mb * 1024 * 1024 // 4 // n
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.w": torch.randn(per, generator=g) for i in range(n)}


def _cpu_seconds(server_pid: int) -> tuple[float, float]:
    """(this process, the S3 server) CPU seconds so far: on 2 shared cores, CPU is what runs out."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    fields = Path(f"/proc/{server_pid}/stat").read_text().split(")")[1].split()
    return ru.ru_utime + ru.ru_stime, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(store, run: str, step: int, state, thread_count: int, server_pid: int) -> tuple:
    import torch

    c0 = _cpu_seconds(server_pid)
    t0 = time.perf_counter()
    ref = store.save_checkpoint(run, step, state, thread_count=thread_count)
    save_s = time.perf_counter() - t0
    c1 = _cpu_seconds(server_pid)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    t0 = time.perf_counter()
    store.load_checkpoint(ref, target)
    load_s = time.perf_counter() - t0
    c2 = _cpu_seconds(server_pid)
    bad = [k for k in state if not torch.equal(state[k], target[k])]
    assert not bad, f"round trip changed {bad[:3]}"
    cpu = {"save": (c1[0] - c0[0], c1[1] - c0[1]), "load": (c2[0] - c1[0], c2[1] - c1[1])}
    return save_s, load_s, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=500, help="state dict size in MB")
    p.add_argument("--repeats", type=int, default=3, help="best of N per backend")
    p.add_argument("--threads", type=int, default=4, help="DCP shard files written in parallel per rank")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from fixtures.s3 import start_s3_server, stop_s3_server

    from flashops.storage import open_store

    state = make_state(args.mb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    mb = nbytes / 1e6
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        server, proc = start_s3_server(Path(tmp) / "s3")
        try:
            disk = open_store(f"file://{tmp}/disk")
            s3 = open_store(f"s3://bench/ckpt", endpoint=server.endpoint, access_key=server.access_key,
                            secret_key=server.secret_key, create_bucket=True)
            settings = s3.backend.settings
            results = {"disk": [], "s3": []}
            for i in range(args.repeats):  # interleaved, so background load hits both alike
                for name, store in (("disk", disk), ("s3", s3)):
                    results[name].append(run_once(store, "bench", i, state, args.threads, proc.pid))
                    store.gc("bench", keep=1)
        finally:
            stop_s3_server(proc)

    best = {k: (min(r[0] for r in v), min(r[1] for r in v)) for k, v in results.items()}
    print(f"checkpoint_io: {mb:.0f} MB state dict ({len(state)} tensors), best of {args.repeats}, "
          f"{os.cpu_count()} cores")
    print(f"parallelism: {args.threads} DCP shard files per rank; S3 {settings.parallelism} concurrent parts of "
          f"{settings.part_size // 2**20} MiB per object (upload and ranged download); sha256 on save and load")
    print(f"{'backend':8} {'save s':>8} {'save MB/s':>10} {'load s':>8} {'load MB/s':>10}   CPU s per GB "
          "(client + S3 server), save / load")
    gb = nbytes / 1e9
    for name, (s, l) in best.items():
        cpu = [r[2] for r in results[name]]
        per = {ph: (min(c[ph][0] for c in cpu) / gb, min(c[ph][1] for c in cpu) / gb) for ph in ("save", "load")}
        cpu_txt = " / ".join(f"{per[ph][0]:.1f} + {per[ph][1]:.1f}" for ph in ("save", "load"))
        print(f"{name:8} {s:8.2f} {mb / s:10.1f} {l:8.2f} {mb / l:10.1f}   {cpu_txt}")
    save_ratio = best["disk"][0] / best["s3"][0]
    load_ratio = best["disk"][1] / best["s3"][1]
    print(f"S3/disk throughput ratio: save {save_ratio:.2f}x, load {load_ratio:.2f}x "
          f"(target >= 0.5x: {'met' if min(save_ratio, load_ratio) >= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
