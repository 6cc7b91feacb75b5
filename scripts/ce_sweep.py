"""Time the fused head + loss (kernels/cross_entropy.py) at the training shape (GPU): the
kernel alone at several (BLOCK_V, num_warps), and the whole operator forward+backward against
the PyTorch form compiled by inductor.

    python scripts/ce_sweep.py [--M 16384] [--d 768] [--V 50280] [--V-pad 50304]

The kernel reads each row twice (max / sum of exps, then the gradient); the second read hits
L2 only while the rows in flight fit in it (50 MB on an H100, ~100 KB a row in bf16), which
the program width decides. One read plus one write of the bf16 logits is the floor printed.
"""
import argparse

import pandas as pd
import torch
import triton

from ssdbench.kernels import cross_entropy as ce

ap = argparse.ArgumentParser()
ap.add_argument("--M", type=int, default=16384)
ap.add_argument("--d", type=int, default=768)
ap.add_argument("--V", type=int, default=50280)
ap.add_argument("--V-pad", type=int, default=50304)
ap.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
a = ap.parse_args()

dev, bf16 = "cuda", torch.bfloat16
x = torch.randn(a.M, a.d, device=dev, dtype=bf16)  # (M, d)
w = (0.02 * torch.randn(a.V_pad, a.d, device=dev)).to(bf16)  # (V_pad, d)
labels = torch.randint(0, a.V, (a.M,), device=dev)  # (M,)
scale = torch.full((1,), 1.0 / a.M, device=dev)  # (1,)
logits = x @ w.T  # (M, V_pad)
floor_ms = 2 * logits.numel() * logits.element_size() / 3.0e12 * 1e3  # one read + one write at ~3 TB/s

rows, default = [], ce._config
for block in a.blocks:
    for warps in a.warps:
        ce._config = lambda n, b=block, nw=warps: (b, nw)  # noqa: E731
        buf = logits.clone()
        ms = triton.testing.do_bench(lambda: ce._launch(buf, labels, scale, a.V, -100), warmup=5, rep=50)
        rows.append(dict(BLOCK_V=block, warps=warps, kernel_ms=ms, floor_ms=floor_ms))
        print(rows[-1], flush=True)
ce._config = default
print(pd.DataFrame(rows).sort_values("kernel_ms").to_string(index=False, float_format=lambda v: f"{v:.3f}"))

# the operator against inductor's fusion of the PyTorch form, forward+backward
xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()


def step(fn):
    loss = fn(xs, ws, labels, a.V)
    loss.backward()


fused = lambda: step(ce.linear_cross_entropy)  # noqa: E731
ref_c = torch.compile(ce.linear_cross_entropy_ref)
ref = lambda: step(ref_c)  # noqa: E731
for name, f in (("fused operator", fused), ("PyTorch form, compiled", ref)):
    f()
    print(f"{name}: {triton.testing.do_bench(f, warmup=3, rep=50):.3f} ms forward+backward (matmuls included)")
