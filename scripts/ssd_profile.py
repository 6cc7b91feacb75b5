"""Run SSD forward+backward at one shape a few times (for ncu / timing on the GPU).

    python scripts/ssd_profile.py --L 4096 --iters 3          # reference shape, bf16

With SSD_NO_AUTOTUNE=1 every kernel takes its first (fixed) config, so ncu sees the same
kernels in every iteration and does not profile autotuning launches.
"""
import argparse

import torch

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
    dev, dt_ = "cuda", torch.bfloat16
    x = torch.randn(batch, a.L, a.H, a.P, device=dev, dtype=dt_, requires_grad=True)  # (batch, L, H, P)
    dt = (torch.rand(batch, a.L, a.H, device=dev) * 0.1).to(dt_).requires_grad_()  # (batch, L, H)
    A = -torch.rand(a.H, device=dev).requires_grad_()  # (H,)
    B = torch.randn(batch, a.L, 1, a.N, device=dev, dtype=dt_, requires_grad=True)  # (batch, L, 1, N)
    C = torch.randn(batch, a.L, 1, a.N, device=dev, dtype=dt_, requires_grad=True)  # (batch, L, 1, N)
    dy = torch.randn(batch, a.L, a.H, a.P, device=dev, dtype=dt_)  # (batch, L, H, P)
    for _ in range(a.iters):
        y = ssd_chunked(x, dt, A, B, C, a.Q)
        y.backward(dy)
    torch.cuda.synchronize()
    print("done", tuple(y.shape))


if __name__ == "__main__":
    main()
