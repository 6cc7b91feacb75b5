"""Time the gated-RMSNorm kernels at Mamba-2 training's shape over tile choices (GPU).

    python scripts/norm_sweep.py [--rows 16384] [--d 1536] [--row 3352]

x (rows, d) contiguous, z a column slice of a (rows, row) projection (as in the model).
Prints us per call for each (rows per tile, num_warps) of the forward and each (rows per
tile, num_warps, programs per SM) of the backward, best first, and the current rule's.
"""
import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from ssdbench.kernels import gated_rmsnorm as gr
from ssdbench.kernels.triton_util import pow2_factor

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=16384)
ap.add_argument("--d", type=int, default=1536)
ap.add_argument("--row", type=int, default=3352)
a = ap.parse_args()
dev, d = "cuda", a.d
x = torch.randn(a.rows, d, device=dev, dtype=torch.bfloat16)
z = torch.randn(a.rows, a.row, device=dev, dtype=torch.bfloat16)[:, :d]
w = torch.rand(d, device=dev) + 0.5
do = torch.randn(a.rows, d, device=dev, dtype=torch.bfloat16)
out = torch.empty_like(x)
rstd = torch.empty(a.rows, 1, device=dev)
dx, dz = torch.empty_like(x), torch.empty_like(x)
BG = triton.next_power_of_2(d)
print("current rule: fwd", gr._config(d, False), "bwd", gr._config(d, True))

fwd = []
for br, nw in itertools.product((1, 2, 4, 8), (2, 4, 8, 16)):
    st = (x.stride(0), z.stride(0), out.stride(0))
    rv = pow2_factor(*st)

    def run():
        gr._gated_rmsnorm_fwd_kernel[(triton.cdiv(a.rows, br),)](
            x, z, w, out, rstd, a.rows, *(s // rv for s in st), 1e-5, G=d, NG=1, BLOCK_R=br,
            BLOCK_NG=1, BLOCK_G=BG, RV=rv, num_warps=nw)
    fwd.append((do_bench(run) * 1e3, br, nw))
fwd.sort()
print("fwd us, rows/tile, warps:", ["%.1f(%d,%d)" % r for r in fwd[:8]])

sms = torch.cuda.get_device_properties(0).multi_processor_count
bwd = []
for br, nw, per_sm in itertools.product((1, 2, 4), (4, 8, 16), (2, 4, 8)):
    n_tiles = triton.cdiv(a.rows, br)
    tpp = max(1, triton.cdiv(n_tiles, per_sm * sms))
    n_prog = triton.cdiv(n_tiles, tpp)
    dw = torch.empty(n_prog, d, device=dev)
    st = (x.stride(0), z.stride(0), do.stride(0), dx.stride(0), dz.stride(0))
    rv = pow2_factor(*st)

    def run():
        gr._gated_rmsnorm_bwd_kernel[(n_prog,)](
            x, z, w, do, rstd, dx, dz, dw, a.rows, tpp, *(s // rv for s in st), G=d, NG=1, BLOCK_R=br,
            BLOCK_NG=1, BLOCK_G=BG, RV=rv, num_warps=nw)
    bwd.append((do_bench(run) * 1e3, br, nw, per_sm))
bwd.sort()
print("bwd us, rows/tile, warps, programs/SM:", ["%.1f(%d,%d,%d)" % r for r in bwd[:8]])
print("bwd current rule (per SM 2):", ["%.1f(%d,%d,%d)" % r for r in bwd if (r[1], r[2]) == gr._config(d, True) and r[3] == 2])
print("fwd current rule:", ["%.1f(%d,%d)" % r for r in fwd if (r[1], r[2]) == gr._config(d, False)])
