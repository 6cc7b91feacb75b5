"""Run SSD forward+backward at one shape a few times (for ncu / timing on the GPU).

    python scripts/ssd_profile.py --L 4096 --iters 3          # reference shape, bf16

With SSD_NO_AUTOTUNE=1 every kernel takes its first (fixed) config, so ncu sees the same
kernels in every iteration and does not profile autotuning launches.
"""
import argparse

import torch

from ssdbench.bench_ssd import ssd_inputs
from ssdbench.kernels.ssd import ssd_chunked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--P", type=int, default=64)
    ap.add_argument("--N", type=int, default=128)
    ap.add_argument("--Q", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    batch = a.tokens // a.L
    # the benchmark's inputs and options (D, dt_bias, softplus): the same kernel variants
    (x, dt, A, B, C), kw, leaves = ssd_inputs(batch, a.L, a.H, a.P, a.N, 1, torch.bfloat16)
    for t in leaves:
        t.requires_grad_()
    dy = torch.randn_like(x)  # (batch, L, H, P)
    for _ in range(a.iters):
        y = ssd_chunked(x, dt, A, B, C, a.Q, **kw)
        y.backward(dy)
    torch.cuda.synchronize()
    print("done", tuple(y.shape))


if __name__ == "__main__":
    main()
