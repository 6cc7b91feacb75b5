"""Time the selective-scan forward walk at fixed layouts, one (states per thread, warps) choice
at a time, without the autotuner (GPU). Prints ms, the cost per state element against the best
N = 16 layout, and the compiled kernel's registers and spills.

    python scripts/scan_sweep.py [--L 4096] [--states 16 128 256] [--per-thread 16 32 64] [--warps 1 2 4 8]

Shape as `bench scan` part (b): 65,536 tokens, D = 2048 channels, bf16, D skip, gate z,
delta bias and softplus. A layout holds `e` of a channel's NP states per thread, so NP / e
lanes share a channel and a program of `w` warps covers 32 w e / NP channels.
"""
import argparse
import time

import pandas as pd
import torch
import triton

from ssdbench.bench_scan import _scan_inputs
from ssdbench.kernels import selective_scan as ss

ap = argparse.ArgumentParser()
ap.add_argument("--L", type=int, default=4096)
ap.add_argument("--dim", type=int, default=2048)
ap.add_argument("--states", type=int, nargs="+", default=[16, 128, 256])
ap.add_argument("--per-thread", type=int, nargs="+", default=[16, 32, 64])
ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
ap.add_argument("--budget", type=float, default=400.0, help="seconds; no new layout after this")
a = ap.parse_args()


def compiled_stats():
    """(registers, spill bytes) of the most recently compiled walk kernel."""
    kern = ss._selective_scan_fwd_walk_kernel
    try:
        caches = [c[0] for c in kern.device_caches.values()]
        last = list(caches[0].values())[-1]
        last._init_handles()
        return last.n_regs, last.n_spills
    except Exception:  # the cache layout differs between triton versions: stats are optional
        return -1, -1


rows, t_start = [], time.time()
for N in a.states:
    NP = triton.next_power_of_2(N)
    ins = _scan_inputs(65536 // a.L, a.dim, a.L, N, torch.bfloat16, "cuda", requires_grad=False)
    for e in a.per_thread:
        if e > NP or NP // e > 32:
            continue
        for nw in a.warps:
            bd = 32 * nw * e // NP
            if bd < 1 or time.time() - t_start > a.budget:
                continue
            ss._walk_candidates = lambda n, bd=bd, nw=nw: ((bd, nw),)
            ss._tuned.cache_clear()
            f = lambda: ss.selective_scan(*ins, delta_softplus=True)  # noqa: E731
            try:
                f()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(f, warmup=5, rep=40)
            except Exception as err:  # out of resources for this layout: note it and go on
                print(f"N={N} e={e} nw={nw}: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            regs, spills = compiled_stats()
            rows.append(dict(N=N, per_thread=e, lanes_per_channel=NP // e, warps=nw, BLOCK_D=bd,
                             ms=ms, regs=regs, spill_bytes=spills))
            print(rows[-1], flush=True)

df = pd.DataFrame(rows)
base = df[df.N == df.N.min()].ms.min()
df["x_min_N"] = df.ms / base
df["per_element_vs_min_N"] = df.x_min_N / (df.N / df.N.min())
print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
best = df.loc[df.groupby("N").ms.idxmin()]
print("\nbest per N\n" + best.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
