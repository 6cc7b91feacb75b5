"""GPU time per SSD kernel of one forward+backward at a shape (torch profiler; GPU).

    python scripts/ssd_kernel_times.py [--L 2048] [--tokens 16384] [--H 24] [--P 64] [--N 128]

Defaults: the SSD call of a 125M Mamba-2 training step (16K tokens, 24 heads, one B/C group).
"""
import argparse

import torch

from ssdbench import bench_report
from ssdbench.bench_ssd import ssd_inputs
from ssdbench.kernels.ssd import ssd_chunked

ap = argparse.ArgumentParser()
ap.add_argument("--L", type=int, default=2048)
ap.add_argument("--tokens", type=int, default=16384)
ap.add_argument("--H", type=int, default=24)
ap.add_argument("--P", type=int, default=64)
ap.add_argument("--N", type=int, default=128)
ap.add_argument("--Q", type=int, default=256)
a = ap.parse_args()
(x, dt, A, B, C), kw, leaves = ssd_inputs(a.tokens // a.L, a.L, a.H, a.P, a.N, 1, torch.bfloat16)
for t in leaves:
    t.requires_grad_()
gy = torch.randn(x.shape[0], a.L, a.H, a.P, device="cuda", dtype=torch.bfloat16)


def step():
    y = ssd_chunked(x, dt, A, B, C, a.Q, **kw)
    torch.autograd.grad(y, leaves, gy)


for _ in range(3):  # autotune, compile
    step()
torch.cuda.synchronize()
k = bench_report.kernel_times(step, iters=5, width=60)
print(k.to_string(index=False))
print(f"total {k.ms_per_iter.sum():.3f} ms")
