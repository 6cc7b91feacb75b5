"""Time the gated RMSNorm and causal conv kernels alone at Mamba-2 training's shapes (GPU).

    python scripts/norm_conv_bench.py [--batch 8] [--L 2048]

125M Mamba-2: in_proj rows of 3352 = z 1536 | xBC 1792 | dt 24. The norm's gate z and the
conv's input are column slices of that projection (row stride 3352, a multiple of 8 but
not of 16), as in training. Rows: the Triton gated norm (custom operator) against the
compiled PyTorch form (inductor), and the conv forward / forward+backward with the row
stride of training and a 16-aligned one, in us per call.
"""
import argparse

import torch
from triton.testing import do_bench

from ssdbench.kernels.causal_conv1d import causal_conv1d
from ssdbench.kernels.gated_rmsnorm import gated_rms_norm, gated_rms_norm_ref

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--L", type=int, default=2048)
a = ap.parse_args()
dev, bf = "cuda", torch.bfloat16
d_inner, conv_dim, H = 1536, 1792, 24


def fwd_bwd(fn, ins, gy):
    def run():
        y = fn(*ins)
        torch.autograd.grad(y, [t for t in ins if t.requires_grad], gy)
    return run


rows = []
for width in (d_inner + conv_dim + H, 3360):
    proj = torch.randn(a.batch, a.L, width, device=dev, dtype=bf)
    z = proj[..., :d_inner].detach().requires_grad_(True)  # (batch, L, d_inner), row stride `width`
    y = torch.randn(a.batch, a.L, d_inner, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(d_inner, device=dev, requires_grad=True)
    gy = torch.randn(a.batch, a.L, d_inner, device=dev, dtype=bf)
    ref_c = torch.compile(gated_rms_norm_ref)
    for name, fn in (("norm triton", gated_rms_norm), ("norm inductor", ref_c)):
        f = lambda *t, fn=fn: fn(*t, 1e-5, None)  # noqa: E731
        rows.append((name, width, do_bench(lambda: f(y, z, w)) * 1e3, do_bench(fwd_bwd(f, (y, z, w), gy)) * 1e3))
    x = proj[..., d_inner:d_inner + conv_dim].detach().requires_grad_(True)  # (batch, L, conv_dim)
    cw = (torch.randn(conv_dim, 4, device=dev) / 4).requires_grad_(True)
    cb = torch.randn(conv_dim, device=dev, requires_grad=True)
    gc = torch.randn(a.batch, a.L, conv_dim, device=dev, dtype=bf)
    f = lambda x, cw, cb: causal_conv1d(x, cw, cb, "silu", channel_last=True, impl="triton")  # noqa: E731
    rows.append(("conv triton", width, do_bench(lambda: f(x, cw, cb)) * 1e3, do_bench(fwd_bwd(f, (x, cw, cb), gc)) * 1e3))
print(f"{'kernel':<16}{'row stride':>11}{'fwd us':>10}{'fwd+bwd us':>12}")
for r in rows:
    print(f"{r[0]:<16}{r[1]:>11}{r[2]:>10.1f}{r[3]:>12.1f}")
