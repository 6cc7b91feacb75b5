"""SSD forward+backward at one shape on the GPU: run it for ncu, or print each kernel's time.

    python scripts/ssd_profile.py --L 4096 --iters 3       # reference shape, bf16 (ncu: scripts/ssd_ncu.sh)
    python scripts/ssd_profile.py --times --L 2048 --tokens 16384 --H 24   # per-kernel table (torch profiler)

The inputs and options (D, dt_bias, softplus) are the benchmark's (`bench_ssd.ssd_inputs`):
the kernel variants profiled are those timed and trained. The second line is the SSD call of
a 125M Mamba-2 training step (16K tokens, 24 heads, one B/C group). With SSD_NO_AUTOTUNE=1
every kernel takes its first (fixed) config, so ncu sees the same kernels in every iteration
and does not profile autotuning launches.
"""
import argparse

import torch

from ssdbench import bench_report
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
    ap.add_argument("--times", action="store_true", help="print GPU time per kernel (after 3 warm-up runs)")
    a = ap.parse_args()
    (x, dt, A, B, C), kw, leaves = ssd_inputs(a.tokens // a.L, a.L, a.H, a.P, a.N, 1, torch.bfloat16)
    for t in leaves:
        t.requires_grad_()
    dy = torch.randn_like(x)  # (batch, L, H, P)

    def step():
        y = ssd_chunked(x, dt, A, B, C, a.Q, **kw)
        torch.autograd.grad(y, leaves, dy)

    for _ in range(3 if a.times else a.iters):  # with --times: autotune and compile first
        step()
    torch.cuda.synchronize()
    if a.times:
        k = bench_report.kernel_times(step, iters=5, width=60)
        print(k.to_string(index=False))
        print(f"total {k.ms_per_iter.sum():.3f} ms")
        print_tuned()


def print_tuned():
    """The configuration each autotuned SSD kernel settled on at this shape (what the table's
    times belong to)."""
    from triton.runtime.autotuner import Autotuner

    from ssdbench.kernels import ssd_triton

    for name, obj in sorted(vars(ssd_triton).items()):
        if isinstance(obj, Autotuner) and getattr(obj, "best_config", None) is not None:
            print(f"{name}: {obj.best_config}")


if __name__ == "__main__":
    main()
