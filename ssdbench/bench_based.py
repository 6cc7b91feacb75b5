"""Benchmark of the Based (Taylor linear attention) Triton kernels, and the SSD at a comparable
state size (GPU only).

    python -m ssdbench.bench_based --out results/h100      # or: ssdbench bench based

Times forward and forward+backward (``triton.testing.do_bench``, median) across L at a fixed
number of tokens per batch (default bf16, 65,536 tokens, H=16, F=16, P=64, normalize=True),
reports time per token, achieved TFLOP/s and GB/s from explicit counts, and, when
``ssdbench.kernels.ssd`` exists, ``ssd_chunked`` with the same heads and head dim and
N=256 (state 16 x 256 x 64 = 262K numbers per layer vs Based's 16 x 273 x 65 = 284K).

Based forward FLOPs, per (batch, head) and chunk of Q tokens, D = 1 + F + F^2 features:
    Q^2 F + Q^2 P      q k^T and (1 + s + s^2/2) v, causal half
  + 2 Q D P + 2 Q D    phi(q) S and phi(q) z (the carried state read by the chunk's queries)
  + 2 Q D P + 2 Q D    state update phi(k)^T v and sum phi(k)
forward+backward FLOPs = 3 x forward (the usual convention). The kernel computes each value
block's normaliser again and does the full Q x Q tile, so it does somewhat more work than this;
with NS > 1 segments per row (column NS) it also runs a state-only forward pass and an
adjoint-only backward pass and combines the segments' states in torch, none of it counted.
Bytes: forward reads q, k, v and writes y and the fp32 normaliser; the backward reads q, k,
v, dy, the normaliser and dy.y (fp32) and writes dq, dk (fp32 partials, one per value
block, summed afterwards), dv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ssdbench import bench_report
import torch


def based_flops(batch, L, H, F, P, Q):
    D = 1 + F + F * F
    nchunks = batch * ((L + Q - 1) // Q)
    return nchunks * H * (Q * Q * F + Q * Q * P + 4 * Q * D * P + 4 * Q * D)


def based_bytes(batch, L, H, F, P, esize, backward, n_vblocks=1):
    tok = batch * L * H
    fwd = tok * ((2 * F + 2 * P) * esize + 4)  # q, k, v, y; den fp32
    if not backward:
        return fwd
    bwd = tok * ((2 * F + 3 * P) * esize + 8 + 2 * 4 * F * n_vblocks)  # q,k,v,dy,dv; den,delta; dq,dk
    return fwd + bwd


def bench_based_case(do_bench, L, tokens, H, F, P, dtype, normalize=True, backward=True):
    from ssdbench.kernels.based import taylor_linear_attention

    batch = max(1, tokens // L)
    dev = "cuda"
    # q, k of the size Based's projections give after a norm: s = q.k / 4 of order 1
    q = torch.randn(batch, L, H, F, device=dev, dtype=dtype) * 0.5  # (batch, L, H, F)
    k = torch.randn(batch, L, H, F, device=dev, dtype=dtype) * 0.5  # (batch, L, H, F)
    v = torch.randn(batch, L, H, P, device=dev, dtype=dtype)  # (batch, L, H, P)
    with torch.no_grad():
        fwd = do_bench(lambda: taylor_linear_attention(q, k, v, normalize=normalize), return_mode="median")
    fb = float("nan")
    if backward:
        leaves = [t.requires_grad_() for t in (q, k, v)]
        gy = torch.randn(batch, L, H, P, device=dev, dtype=dtype)

        def step():
            taylor_linear_attention(q, k, v, normalize=normalize).backward(gy)

        fb = do_bench(step, grad_to_none=leaves, return_mode="median")
    return batch, fwd, fb


def bench_ssd_case(do_bench, L, tokens, H, P, N, Q, dtype):
    from ssdbench.kernels.ssd import ssd_chunked

    batch = max(1, tokens // L)
    dev = "cuda"
    x = torch.randn(batch, L, H, P, device=dev, dtype=dtype)  # (batch, L, H, P)
    dt = torch.nn.functional.softplus(torch.randn(batch, L, H, device=dev) - 3.0).to(dtype)  # (batch, L, H)
    A = -torch.exp(torch.rand(H, device=dev) * 2.77)  # (H,)
    B = torch.randn(batch, L, 1, N, device=dev, dtype=dtype)  # (batch, L, G, N)
    C = torch.randn(batch, L, 1, N, device=dev, dtype=dtype)  # (batch, L, G, N)
    with torch.no_grad():
        fwd = do_bench(lambda: ssd_chunked(x, dt, A, B, C, Q), return_mode="median")
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    gy = torch.randn(batch, L, H, P, device=dev, dtype=dtype)

    def step():
        ssd_chunked(x, dt, A, B, C, Q).backward(gy)

    fb = do_bench(step, grad_to_none=leaves, return_mode="median")
    return batch, fwd, fb


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for based_bench.csv / .md")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--featdim", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-normalize", action="store_true")
    ap.add_argument("--no-ssd", action="store_true", help="skip the SSD comparison")
    ap.add_argument("--ssd-dstate", type=int, default=256, help="SSD N (256: state comparable to Based)")
    ap.add_argument("--ssd-chunk", type=int, default=256)
    args = ap.parse_args(argv)
    bench_report.require_cuda("based")
    from triton.testing import do_bench

    from ssdbench.kernels import based as based_mod

    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()
    H, F, P, tokens = args.heads, args.featdim, args.headdim, args.tokens
    print(f"device: {torch.cuda.get_device_name()}; Based state per layer "
          f"{based_mod.based_state_size(F, P, H):,} numbers")
    rows = []
    for L in args.lens:
        batch, f, fb = bench_based_case(do_bench, L, tokens, H, F, P, dtype, normalize=not args.no_normalize)
        # the launch plan the kernels used (same rule, same inputs): chunk, value block, segments
        plan = based_mod._plan(F, P, batch * H, L, torch.device("cuda"))
        Q, BV, NS = plan.BQ, plan.BV, plan.NS
        nv = -(-P // BV)
        fl = based_flops(batch, L, H, F, P, Q)
        by_f = based_bytes(batch, L, H, F, P, esize, False)
        by_b = based_bytes(batch, L, H, F, P, esize, True, nv)
        ntok = batch * L
        rows.append(dict(op="based", L=L, batch=batch, state=based_mod.based_state_size(F, P, H),
                         chunk=Q, BV=BV, NS=NS, fwd_ms=f, fwdbwd_ms=fb,
                         fwd_ns_per_tok=f * 1e6 / ntok, fwdbwd_ns_per_tok=fb * 1e6 / ntok,
                         fwd_TFLOPs=fl / f / 1e9, fwdbwd_TFLOPs=3 * fl / fb / 1e9,
                         fwd_GBs=by_f / f / 1e6, fwdbwd_GBs=by_b / fb / 1e6))
        print(rows[-1], flush=True)
    if not args.no_ssd:
        try:
            import ssdbench.kernels.ssd  # noqa: F401
        except ImportError as e:
            print(f"bench_based: SSD comparison skipped ({e})", file=sys.stderr)
        else:
            N, Qs = args.ssd_dstate, args.ssd_chunk
            for L in args.lens:
                batch, f, fb = bench_ssd_case(do_bench, L, tokens, H, P, N, Qs, dtype)
                nch = batch * ((L + Qs - 1) // Qs)
                fl = nch * (Qs * Qs * N + H * Qs * Qs * P + 4 * H * Qs * P * N)
                by_f = batch * L * ((2 * H * P + 2 * N) * esize + H * esize)
                ntok = batch * L
                rows.append(dict(op=f"ssd_N{N}", L=L, batch=batch, state=H * N * P, chunk=Qs, BV=P, NS=1,
                                 fwd_ms=f, fwdbwd_ms=fb,
                                 fwd_ns_per_tok=f * 1e6 / ntok, fwdbwd_ns_per_tok=fb * 1e6 / ntok,
                                 fwd_TFLOPs=fl / f / 1e9, fwdbwd_TFLOPs=3 * fl / fb / 1e9,
                                 fwd_GBs=by_f / f / 1e6, fwdbwd_GBs=float("nan")))
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    bench_report.print_table(df, f"Based Taylor linear attention ({args.dtype}, {tokens} tokens/batch, H={H}, F={F}, P={P})")
    bench_report.write(df, args.out, "based_bench", "ssdbench.bench_based", argv)
    return df


if __name__ == "__main__":
    main()
