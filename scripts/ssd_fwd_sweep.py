"""Time the SSD forward with one kernel pinned to a fixed configuration (GPU, no autotuner for
that kernel; the others keep theirs). Prints the forward's ms per configuration, so the
difference between rows is the pinned kernel's.

    python scripts/ssd_fwd_sweep.py state --L 4096 8192 --N 128 256
    python scripts/ssd_fwd_sweep.py chunk --L 4096 --N 256
    python scripts/ssd_fwd_sweep.py chunk --short --L 4096 --N 256 64   # register caps only

state: the forward state walk `_ssd_state_fwd` over (warps, stages, BP, BN, T).
chunk: the output kernel `_ssd_chunk_fwd` over (warps, stages, T, BNK), BNK being the width of
the state slices of its C_t S^T loop.
Each row's output is compared with the autotuned run's (max |y - y_ref| / max |y_ref|): a
configuration that computes something else shows there, not only in the tests.
Shape as `bench ssd`: bf16, 65,536 tokens, H = 32, P = 64, chunk 256, D, dt_bias, softplus.
"""
import argparse
import time

import pandas as pd
import torch
import triton

from ssdbench.bench_ssd import ssd_inputs
from ssdbench.kernels import ssd_triton as st
from ssdbench.kernels.ssd import ssd_chunked

# (num_warps, num_stages, BP, BN, T)
STATE = [(4, 3, 64, 64, 64), (4, 2, 64, 64, 64), (4, 4, 64, 64, 64), (4, 3, 32, 64, 64),
         (4, 3, 64, 32, 64), (8, 2, 64, 128, 64), (8, 3, 64, 128, 64), (4, 2, 64, 128, 64),
         (4, 3, 32, 128, 64), (4, 2, 32, 128, 64), (4, 3, 16, 128, 64), (8, 2, 64, 256, 64),
         (4, 2, 32, 256, 64), (4, 3, 32, 256, 64), (4, 2, 16, 256, 64), (8, 2, 32, 256, 64),
         (4, 3, 64, 128, 64), (4, 2, 64, 64, 128), (4, 3, 32, 128, 32), (4, 4, 32, 128, 32)]
# register caps (maxnreg): 3 or 4 programs of 4 warps a SM instead of 2 or 3 (ncu, N = 256:
# the chunk kernel at 217 registers, the state walk at 138)
STATE_CAP = [(4, 2, 64, 128, 64), (4, 3, 64, 128, 64), (4, 2, 64, 128, 64, 128),
             (4, 3, 64, 128, 64, 128), (4, 3, 64, 64, 64), (4, 3, 64, 64, 64, 128)]
CHUNK_CAP = [(4, 2, 64, 64), (4, 3, 64, 64), (4, 2, 64, 64, 168), (4, 3, 64, 64, 168),
             (4, 2, 64, 64, 128), (4, 2, 64, 128, 168)]
# (num_warps, num_stages, T, BNK)
CHUNK = [(4, 2, 64, 64), (4, 2, 64, 32), (4, 3, 64, 32), (4, 2, 64, 128), (4, 3, 64, 64),
         (8, 2, 64, 64), (8, 2, 128, 64), (8, 2, 128, 32), (4, 2, 128, 64), (8, 3, 128, 64)]

ap = argparse.ArgumentParser()
ap.add_argument("kernel", choices=["state", "chunk"])
ap.add_argument("--L", type=int, nargs="+", default=[4096])
ap.add_argument("--N", type=int, nargs="+", default=[128])
ap.add_argument("--short", action="store_true", help="the register-cap rows only")
ap.add_argument("--budget", type=float, default=300.0, help="seconds; no new row after this")
a = ap.parse_args()

tuned_state, tuned_chunk, slice_of, fixed_of = st._state_fwd, st._chunk_fwd, st._state_slice, st._fixed


def pin(cfg):
    """Pin the swept kernel to cfg (None: back to its autotuner). A sixth (state) or fifth
    (chunk) element is a register cap per thread (Triton's maxnreg)."""
    st._state_fwd, st._STATE_FWD_FIXED = tuned_state, {}
    st._chunk_fwd, st._CHUNK_FWD_FIXED = tuned_chunk, {}
    st._state_slice, st._fixed = slice_of, fixed_of
    if cfg is None:
        return
    cap = dict(maxnreg=cfg[-1]) if len(cfg) == (6 if a.kernel == "state" else 5) else {}
    if a.kernel == "state":
        nw, ns, bp, bn, t = cfg[:5]
        st._state_fwd = st._ssd_state_fwd
        st._STATE_FWD_FIXED = dict(BP=bp, BN=bn, T=t, num_warps=nw, num_stages=ns, **cap)
    else:
        nw, ns, t, bnk = cfg[:4]
        st._chunk_fwd = st._ssd_chunk_fwd
        st._CHUNK_FWD_FIXED = dict(T=t, num_warps=nw, num_stages=ns, **cap)
        st._state_slice = lambda BN, bnk=bnk: min(BN, bnk)
        # the stages as given: the launcher's fixed path cuts them to one at N > 128 (a
        # shared-memory guard for untuned fp32 runs); the autotuner has no such cut
        st._fixed = lambda c, BN: dict(c)


rows, t0 = [], time.time()
for N in a.N:
    for L in a.L:
        (x, dt, A, B, C), kw, _ = ssd_inputs(65536 // L, L, 32, 64, N, 1, torch.bfloat16)
        f = lambda: ssd_chunked(x, dt, A, B, C, 256, **kw)  # noqa: E731
        y_ref = None  # the autotuned run's output: every pinned configuration must give it
        swept = (STATE_CAP if a.short else STATE) if a.kernel == "state" else (CHUNK_CAP if a.short else CHUNK)
        for cfg in [None] + swept:
            if time.time() - t0 > a.budget:
                break
            pin(cfg)
            if cfg is not None and a.kernel == "state" and cfg[3] > max(64, triton.next_power_of_2(N)):
                continue
            try:
                with torch.no_grad():
                    y = f().float()
                    y_ref = y if y_ref is None else y_ref
                    diff = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
                    ms = triton.testing.do_bench(f, warmup=10, rep=100, return_mode="median")
                err = ""
            except Exception as e:  # out of shared memory, registers: recorded, not fatal
                ms, diff, err = float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:60]}"
            rows.append(dict(N=N, L=L, config="autotuned" if cfg is None else str(cfg), fwd_ms=ms,
                             max_rel_diff=diff, error=err))
            print(rows[-1], flush=True)
pin(None)
print(pd.DataFrame(rows).to_string(index=False))
