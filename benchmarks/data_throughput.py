"""Data loading throughput and memory: is the loader ever the bottleneck?

    .venv/bin/python benchmarks/data_throughput.py                 # defaults below; joyai-flash-small steps dominate
    .venv/bin/python benchmarks/data_throughput.py --cap-mb 32 --rounds 3

Measured in one run, in interleaved rounds (the machine is shared, so only same-run ratios mean much):
  * train   joyai-flash-small's training step (forward + backward + AdamW) on B x L tokens: tokens/s
  * local   tokens/s one rank of two is handed by PretrainLoader from a prepared dataset on local disk
  * s3      the same from the real S3 server (seaweedfs `weed mini`, started here)
  * raw     tokens/s one rank of two gets from RAW JSONL text under a prefix (RawPretrainLoader: its row streams,
            tokenizing in the loop): why pretraining should read prepared data
  * prepare `flashops data prepare` tokens/s (JSONL rows -> token shards, local disk)
  * memory  peak RSS of a child process streaming a prepared dataset 10x larger than a memory cap (the cap is
            enforced with RLIMIT_AS on the child's growth), and of one streaming a dataset of the cap's size:
            the two peaks must match (memory independent of dataset size)
Target: local and s3 >= 20x train.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def machine() -> str:
    """The CPU's model name, the cores this process may use, and the load average when measured."""
    from flashops.model.cpu_kernels import cpu_model

    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPU(s), load average {os.getloadavg()[0]:.1f}"


def synthetic_dataset(uri: str, tokens: int, shard_tokens: int, seed: int = 0) -> None:
    """A prepared dataset of random tokens in documents of 50-2000 tokens (fast to make at any size)."""
    from flashops.model.tokenizer import load_tokenizer
    from flashops.storage import open_store
    from flashops.storage import datasets as prepared
    from flashops.trainers.prepare import tokenizer_sha256

    backend = open_store(uri).backend
    prepared.begin(backend, overwrite=True)
    rng = np.random.default_rng(seed)
    vocab = load_tokenizer().get_vocab_size()
    w = prepared.PartWriter(backend, 0, "uint16", shard_tokens, with_mask=False)
    left = tokens
    while left > 0:
        n = min(left, int(rng.integers(50, 2000)))
        w.add(rng.integers(3, vocab, n, dtype=np.uint16))
        left -= n
    w.close(rows=0, source_uri="synthetic")
    prepared.finalize(backend, 1, {"stage": "pretrain", "source": "synthetic", "tokenizer_sha256": tokenizer_sha256(),
                                   "vocab_size": vocab, "dtype": "uint16", "mask": False, "version": ""})


def loader_rate(uri: str, seq_len: int, batch: int, seconds: float) -> float:
    """Tokens/s delivered to rank 0 of 2 (its rows of each global batch), read for `seconds`."""
    from flashops.storage.datasets import open_token_dataset
    from flashops.trainers.loader import PretrainLoader

    ld = PretrainLoader(open_token_dataset(uri), seq_len, batch, seed=0, rank=0, world=2)
    got, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = ld.next_batch()
        got += b.tokens.shape[0] * seq_len
    rate = got / (time.perf_counter() - t0)
    ld.close()
    return rate


def train_step(seq_len: int, batch: int):
    """joyai-flash-small's training step on B x L tokens (built and warmed up once); returns a timer."""
    import torch

    from flashops.model import JoyAIFlash, get_config
    from flashops.trainers.losses import masked_ce

    torch.manual_seed(0)
    model = JoyAIFlash(get_config("joyai-flash-small"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(3, 2000, (batch, seq_len + 1))
    mask = torch.ones(batch, seq_len, dtype=torch.long)

    def step():
        out = model(tokens[:, :-1], mtp=False)
        ce, _ = masked_ce(out.logits, tokens[:, 1:], mask)
        (ce / mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up

    def rate() -> float:
        t0 = time.perf_counter()
        step()
        return batch * seq_len / (time.perf_counter() - t0)

    return rate


def write_text(raw: Path, mb: int) -> int:
    """JSONL shards of plain-text documents (`mb` MB in all) under `raw`; returns the bytes written."""
    from flashops.trainers.tasks import random_task
    import random

    raw.mkdir(exist_ok=True)
    rng = random.Random(0)
    size, s = 0, 0
    while size < mb * 1_000_000:
        lines = []
        for _ in range(2000):
            t = random_task(rng)
            lines.append(json.dumps({"text": " ".join(f"{t.question} {t.reasoning}. {t.answer}." for _ in range(4))}))
        body = "\n".join(lines) + "\n"
        (raw / f"part-{s:03d}.jsonl").write_text(body)
        size, s = size + len(body), s + 1
    return size


def raw_rate(uri: str, seq_len: int, batch: int, seconds: float) -> float:
    """Tokens/s delivered to rank 0 of 2 from raw JSONL rows (streamed and tokenized in the loop)."""
    from flashops.model.tokenizer import TokenizerCodec
    from flashops.trainers.corpora import open_dataset
    from flashops.trainers.loader import RawPretrainLoader

    codec = TokenizerCodec(skip_special_tokens=False)
    ld = RawPretrainLoader(open_dataset(uri, "pretrain"), seq_len, batch, 0, 2,
                           lambda row: (codec.documents([row["text"]])[0], None))
    got, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        got += ld.next_batch().tokens.shape[0] * seq_len
    rate = got / (time.perf_counter() - t0)
    ld.close()
    return rate


def prepare_rate(tmp: Path, size: int) -> dict:
    from flashops.trainers.prepare import prepare

    r = prepare(f"file://{tmp}/raw/", f"file://{tmp}/prep-text", overwrite=True)
    return {"mb": round(size / 1e6, 1), "tokens": r.tokens, "seconds": round(r.seconds, 2),
            "tokens_per_s": round(r.tokens_per_s)}


CHILD = r"""
import os, resource, sys, time, json
sys.path.insert(0, {repo!r})
from flashops.storage.datasets import open_token_dataset
from flashops.trainers.loader import PretrainLoader
ds = open_token_dataset({uri!r})
ld = PretrainLoader(ds, {seq_len}, {batch}, seed=0, rank=0, world=1)
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {cap}, vm + {cap}))  # growth beyond the cap: MemoryError
def status(key):  # kB; VmHWM is this process image's peak RSS (ru_maxrss would carry the parent's across exec)
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
base = status("VmRSS")
n = 0
for _ in range(ld.batches):  # one whole epoch: every token of the dataset
    n += ld.next_batch().tokens.size
ld.close()
print(json.dumps({{"tokens": n, "base_kb": base, "peak_kb": status("VmHWM")}}))
"""


def stream_peak(uri: str, cap: int, seq_len: int, batch: int) -> dict:
    code = CHILD.format(repo=str(REPO), uri=uri, cap=cap, seq_len=seq_len, batch=batch)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="global batch (rows); the loader is timed as rank 0 of 2")
    ap.add_argument("--mb", type=int, default=64, help="size of the prepared dataset the rates are read from")
    ap.add_argument("--cap-mb", type=int, default=32, help="memory cap; the streamed dataset is 10x this")
    ap.add_argument("--prepare-mb", type=int, default=8, help="JSONL text tokenized for the prepare rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="per loader measurement")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from fixtures.s3 import start_s3_server, stop_s3_server

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server, proc = start_s3_server(tmp / "s3")
        try:
            os.environ.update(server.env())
            server.make_bucket("bench")
            tokens = args.mb * 1_000_000 // 2
            synthetic_dataset(f"file://{tmp}/local", tokens, 1 << 22)
            synthetic_dataset("s3://bench/prep", tokens, 1 << 22)
            text_size = write_text(tmp / "raw", args.prepare_mb)
            rows = []
            train_rate = train_step(args.seq_len, args.batch)
            for r in range(args.rounds):  # interleaved: each round measures all three back to back
                row = {"train": train_rate(),
                       "local": loader_rate(f"file://{tmp}/local", args.seq_len, args.batch, args.seconds),
                       "s3": loader_rate("s3://bench/prep", args.seq_len, args.batch, args.seconds),
                       "raw": raw_rate(f"file://{tmp}/raw/", args.seq_len, args.batch, args.seconds)}
                for k in ("local", "s3", "raw"):
                    row[f"{k}_x_train"] = row[k] / row["train"]
                rows.append(row)
                print(f"round {r + 1}: " + "  ".join(f"{k} {v:,.1f}" for k, v in row.items()), flush=True)
            prep = prepare_rate(tmp, text_size)
            cap = args.cap_mb * 1_000_000
            synthetic_dataset(f"file://{tmp}/big", 10 * cap // 2, 1 << 24, seed=1)
            synthetic_dataset(f"file://{tmp}/small", cap // 2, 1 << 24, seed=2)
            big = stream_peak(f"file://{tmp}/big", cap, 2048, 64)  # long rows: fewer Python steps per token
            small = stream_peak(f"file://{tmp}/small", cap, 2048, 64)
        finally:
            stop_s3_server(proc)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    report = {
        "machine": machine(), "seq_len": args.seq_len, "global_batch": args.batch,
        "train_tokens_per_s (joyai-flash-small)": round(med["train"], 1),
        "loader_tokens_per_s_per_rank": {"local": round(med["local"]), "s3": round(med["s3"]),
                                         "raw_jsonl_local": round(med["raw"])},
        "loader_x_train (median of paired rounds)": {"local": round(med["local_x_train"], 1),
                                                     "s3": round(med["s3_x_train"], 1),
                                                     "raw_jsonl_local": round(med["raw_x_train"], 1)},
        "prepare": prep,
        "stream_memory": {"cap_mb": args.cap_mb,
                          "big": {"dataset_mb": 10 * args.cap_mb, "tokens": big["tokens"],
                                  "peak_rss_mb": round(big["peak_kb"] / 1024, 1),
                                  "rss_before_mb": round(big["base_kb"] / 1024, 1)},
                          "small": {"dataset_mb": args.cap_mb, "tokens": small["tokens"],
                                    "peak_rss_mb": round(small["peak_kb"] / 1024, 1),
                                    "rss_before_mb": round(small["base_kb"] / 1024, 1)}},
        "target_met (>= 20x)": med["local_x_train"] >= 20 and med["s3_x_train"] >= 20,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
