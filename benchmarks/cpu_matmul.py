"""fp32 matmul on this CPU: torch's default (MKL sgemm) against oneDNN (`mkldnn._linear_pointwise`, full fp32),
on the shapes a JoyAI-Flash training step runs, forward (x W^T) and both backward products. This is the
measurement behind flashops.model.cpu_kernels' matmul choice (which this script shows in full).

    .venv/bin/python benchmarks/cpu_matmul.py                  # 2 threads, 512 rows (batch 2 x 256)
    .venv/bin/python benchmarks/cpu_matmul.py --threads 1 --rows 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

# (in, out) of the linears in torchtitan's 33M debug config / joyai-flash-small
SHAPES = [(256, 3072), (256, 576), (512, 4096), (2048, 256), (256, 1024), (1024, 256), (512, 1536), (256, 4096)]


def onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def seconds(fn, repeat):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512, help="tokens per step (batch x sequence)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"fp32 GFLOP/s, {args.rows} rows, {args.threads} threads, median of {args.repeat}; "
          f"oneDNN's max |error| vs float64 shown for the forward\n")
    print(f"{'in x out':>12s} {'product':>8s} {'MKL':>8s} {'oneDNN':>8s} {'ratio':>6s} {'err MKL':>9s} {'err oneDNN':>10s}")
    ratios = []
    for d_in, d_out in SHAPES:
        x, w, g = torch.randn(args.rows, d_in), torch.randn(d_out, d_in), torch.randn(args.rows, d_out)
        flops = 2 * args.rows * d_in * d_out
        cases = {
            "fwd": (lambda: x @ w.t(), lambda: onednn(x, w)),
            "grad_x": (lambda: g @ w, lambda: onednn(g, w.t())),
            "grad_w": (lambda: g.t() @ x, lambda: onednn(g.t(), x.t())),
        }
        ref = (x.double() @ w.double().t())
        for name, (mkl_fn, dnn_fn) in cases.items():
            mkl, dnn = flops / seconds(mkl_fn, args.repeat) / 1e9, flops / seconds(dnn_fn, args.repeat) / 1e9
            ratios.append(dnn / mkl)
            err = (f"{(mkl_fn().double() - ref).abs().max():9.1e} {(dnn_fn().double() - ref).abs().max():10.1e}"
                   if name == "fwd" else "")
            print(f"{d_in:>5d} x {d_out:<5d} {name:>8s} {mkl:8.1f} {dnn:8.1f} {dnn / mkl:5.2f}x {err}")
    print(f"\ngeometric mean oneDNN / MKL: {statistics.geometric_mean(ratios):.2f}x")


if __name__ == "__main__":
    main()
