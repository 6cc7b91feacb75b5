"""Time the causal-conv backward kernels at Mamba-2 training's shape over tile choices (GPU).

    python scripts/conv_sweep.py [--batch 8] [--L 2048] [--dim 1792] [--row 3392]

x is a channel-last slice of a (batch, L, row) projection output, as Mamba-2 passes it.
Prints us per call of _causal_conv1d_bwd_g_kernel for each (BLOCK_D, BLOCK_L, SPAN,
num_warps), and the autotuned forward/backward of CausalConv1dFn for comparison.
"""
import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from ssdbench.kernels import causal_conv1d as cc
from ssdbench.kernels.triton_util import pow2_factor

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--L", type=int, default=2048)
ap.add_argument("--dim", type=int, default=1792)
ap.add_argument("--row", type=int, default=3392)  # in_proj width 3352 padded to 64 columns
a = ap.parse_args()
dev, W = "cuda", 4
proj = torch.randn(a.batch, a.L, a.row, device=dev, dtype=torch.bfloat16)
x = proj[..., :a.dim].transpose(1, 2)  # (batch, D, L) channel-last view
w = torch.randn(a.dim, W, device=dev) / W
bias = torch.randn(a.dim, device=dev)
dout = torch.randn(a.batch, a.L, a.dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # contiguous (batch, L, D)

xr = x.detach().requires_grad_(True)
y = cc.causal_conv1d(xr, w, bias, "silu", impl="triton")
fwd = do_bench(lambda: cc.causal_conv1d(x, w, bias, "silu", impl="triton"))
bwd = do_bench(lambda: torch.autograd.grad(y, xr, dout, retain_graph=True))
print(f"autotuned: fwd {fwd * 1e3:.1f} us, bwd (g + dx + sums) {bwd * 1e3:.1f} us")

rows = []
for bd, bl, span, nw in itertools.product((16, 32, 64, 128), (32, 64), (512, 1024), (2, 4, 8)):
    n_l = triton.cdiv(a.L, span)
    g = torch.empty(a.batch, a.L, a.dim, device=dev, dtype=torch.bfloat16)
    part = torch.empty(a.batch, n_l, a.dim * 5, device=dev, dtype=torch.float32)  # dw (D, 4) then db (D,)
    xv, ov = pow2_factor(x.stride(2)), pow2_factor(dout.stride(2))
    args = (x, w, bias, x, dout, g, part, part[..., a.dim * 4:], a.dim, a.L, n_l, part.stride(1),
            x.stride(0), x.stride(1), x.stride(2) // xv,
            *w.stride(), dout.stride(0), dout.stride(1), dout.stride(2) // ov, 0, 0)

    def run():
        cc._causal_conv1d_bwd_g_kernel[cc._grid(a.dim, bd, n_l, a.batch)](
            *args, W=W, WP=4, HAS_BIAS=True, SILU=True, HAS_SEQ=False, XV=xv, OV=ov, SPAN=span,
            BLOCK_D=bd, BLOCK_L=bl, num_warps=nw)
    try:
        rows.append((do_bench(run) * 1e3, bd, bl, span, nw))
    except Exception as e:  # noqa: BLE001 - a config that does not compile (registers, smem)
        print("skip", bd, bl, span, nw, type(e).__name__)
rows.sort()
print("bwd_g us, BLOCK_D, BLOCK_L, SPAN, num_warps (autotuned over kernels/causal_conv1d._BWD_CONFIGS, SPAN 512)")
for r in rows[:12]:
    print("%.1f %d %d %d %d" % r)
cfgs = {(bd, bl, nw) for bd, bl, nw in cc._BWD_CONFIGS}
print("autotune candidates at SPAN 512:", ["%.1f(%d,%d,%d)" % (r[0], r[1], r[2], r[4]) for r in rows
                                          if r[3] == 512 and (r[1], r[2], r[4]) in cfgs])
