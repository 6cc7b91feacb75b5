"""Benchmark of the chunked SSD kernels against causal SDPA attention (GPU only).

    python -m ssdbench.bench_ssd --out results/h100      # or: ssdbench bench ssd

Times forward and forward+backward (``triton.testing.do_bench``, median) at the reference
shape of the design card (bf16, 65,536 tokens per batch, H=32, P=64, N=128, one B/C group,
chunk 256) across L, then N in {64, 128, 256} at L=4096, and torch SDPA causal attention
with the same heads (32 x 64) across L. TFLOP/s and GB/s come from explicit counts:

SSD forward FLOPs, per chunk of Q tokens (G groups of B/C, H heads):
    G * Q^2 N          C B^T, causal half (shared by the heads of a group)
  + H * Q^2 P          (C B^T o L)(dt x), causal half
  + H * 2 Q P N        chunk state  (dt x)^T B
  + H * 2 Q P N        state -> output  C S^T
forward+backward FLOPs = 3 x forward (the usual convention: the backward of a product is two
products). SSD bytes: every input read once and every output written once (forward:
x, dt, B, C in, y out; backward adds dy in and dx, ddt, dB, dC out).
SDPA causal: forward 2 * batch * H * L^2 * P FLOPs (half of 4 b H L^2 P), forward+backward
3.5 x forward (FlashAttention's count); bytes: q, k, v in, o out (backward: + do, dq, dk, dv).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ssdbench import bench_report
import torch


def _ssd_flops(batch, L, H, P, N, G, Q):
    nchunks = batch * ((L + Q - 1) // Q)
    return nchunks * (G * Q * Q * N + H * Q * Q * P + 4 * H * Q * P * N)


def _ssd_bytes(batch, L, H, P, N, G, esize, backward):
    tok = batch * L
    fwd = tok * (2 * H * P + 2 * G * N) * esize + tok * H * esize  # x, y, B, C, dt
    if not backward:
        return fwd
    return fwd + tok * (3 * H * P + 2 * G * N) * esize + tok * H * esize  # dy, dx, dB, dC, ddt


def _ceilings(do_bench):
    """The device's own copy bandwidth and bf16 matmul rate (the two floors' denominators)."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    gbs = 2 * a.numel() / ms / 1e6
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: m @ m, return_mode="median")
    tflops = 2 * 8192 ** 3 / ms / 1e9
    return gbs, tflops


def ssd_inputs(batch, L, H, P, N, G, dtype, device="cuda"):
    """Random inputs of the timed SSD runs: ((x, dt, A, B, C), options, leaves). The options
    (D, dt_bias, softplus) are the Mamba-2 block's, so the kernels timed, profiled
    (profile_ssd, scripts/ssd_profile.py) and used in training are the same variants."""
    x = torch.randn(batch, L, H, P, device=device, dtype=dtype)  # (batch, L, H, P)
    dt = torch.randn(batch, L, H, device=device, dtype=dtype) * 0.5 - 3.0  # (batch, L, H) before softplus
    A = -torch.exp(torch.rand(H, device=device) * 2.77)  # (H,) in [-16, -1]
    B = torch.randn(batch, L, G, N, device=device, dtype=dtype)  # (batch, L, G, N)
    C = torch.randn(batch, L, G, N, device=device, dtype=dtype)  # (batch, L, G, N)
    D = torch.randn(H, device=device)  # (H,)
    dt_bias = torch.randn(H, device=device) * 0.1  # (H,)
    return (x, dt, A, B, C), dict(D=D, dt_bias=dt_bias, dt_softplus=True), [x, dt, A, B, C, D, dt_bias]


def bench_ssd_case(do_bench, L, tokens, H, P, N, G, Q, dtype, backward=True):
    from ssdbench.kernels.ssd import ssd_chunked

    batch = max(1, tokens // L)
    dev = "cuda"
    (x, dt, A, B, C), kw, leaves = ssd_inputs(batch, L, H, P, N, G, dtype, dev)
    with torch.no_grad():
        fwd = do_bench(lambda: ssd_chunked(x, dt, A, B, C, Q, **kw), return_mode="median")
        graph = _graph_ms(do_bench, lambda: ssd_chunked(x, dt, A, B, C, Q, **kw))
    bwd = float("nan")
    if backward:
        leaves = [t.requires_grad_() for t in leaves]
        gy = torch.randn(batch, L, H, P, device=dev, dtype=dtype)

        def step():
            y = ssd_chunked(x, dt, A, B, C, Q, **kw)
            y.backward(gy)

        bwd = do_bench(step, grad_to_none=leaves, return_mode="median")
    return batch, fwd, bwd, graph


def _graph_ms(do_bench, fn):
    """The same forward replayed from a CUDA graph: launch overhead removed."""
    try:
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            fn()
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return do_bench(g.replay, return_mode="median")
    except Exception as e:  # graphs are a diagnostic here, never a reason to fail
        print(f"cuda graph capture failed: {e}", file=sys.stderr)
        return float("nan")


def bench_sdpa_case(do_bench, L, tokens, H, P, dtype):
    import torch.nn.functional as F

    batch = max(1, tokens // L)
    q, k, v = (torch.randn(batch, H, L, P, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        fwd = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
    do = torch.randn_like(q)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    bwd = do_bench(step, grad_to_none=[q, k, v], return_mode="median")
    return batch, fwd, bwd


def profile_ssd(L, tokens, H, P, N, G, Q, dtype):
    """Per-kernel CUDA time of one forward+backward (torch.profiler)."""
    from ssdbench.kernels.ssd import ssd_chunked

    batch = tokens // L
    (x, dt, A, B, C), kw, leaves = ssd_inputs(batch, L, H, P, N, G, dtype)
    for t in leaves:
        t.requires_grad_()
    gy = torch.randn(batch, L, H, P, device="cuda", dtype=dtype)  # (batch, L, H, P)
    for _ in range(3):
        ssd_chunked(x, dt, A, B, C, Q, **kw).backward(gy)
    return bench_report.kernel_times(lambda: ssd_chunked(x, dt, A, B, C, Q, **kw).backward(gy))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for ssd_bench.csv / .md")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--no-nsweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel times at L=4096")
    args = ap.parse_args(argv)
    bench_report.require_cuda("ssd")
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()
    H, P, N, G, Q, tokens = args.heads, args.headdim, args.dstate, args.ngroups, args.chunk, args.tokens
    gbs, tfl = _ceilings(do_bench)
    print(f"device: {torch.cuda.get_device_name()}  copy {gbs:.0f} GB/s  bf16 matmul {tfl:.0f} TFLOP/s")
    rows = []

    def ssd_row(L, n):
        batch, f, fb, fg = bench_ssd_case(do_bench, L, tokens, H, P, n, G, Q, dtype)
        fl = _ssd_flops(batch, L, H, P, n, G, Q)
        by_f = _ssd_bytes(batch, L, H, P, n, G, esize, False)
        by_b = _ssd_bytes(batch, L, H, P, n, G, esize, True)
        floor_f = max(fl / (tfl * 1e9), by_f / (gbs * 1e6))
        rows.append(dict(op="ssd", L=L, batch=batch, N=n, fwd_ms=f, fwdbwd_ms=fb, fwd_graph_ms=fg,
                         fwd_TFLOPs=fl / f / 1e9, fwdbwd_TFLOPs=3 * fl / fb / 1e9,
                         fwd_GBs=by_f / f / 1e6, fwdbwd_GBs=by_b / fb / 1e6, fwd_floor_ms=floor_f))
        print(rows[-1], flush=True)

    for L in args.lens:
        ssd_row(L, N)
    if not args.no_nsweep:
        for n in (64, 128, 256):
            if n != N or 4096 not in args.lens:
                ssd_row(4096, n)
    if not args.no_sdpa:
        for L in args.lens:
            batch, f, fb = bench_sdpa_case(do_bench, L, tokens, H, P, dtype)
            fl = 2 * batch * H * L * L * P
            by_f = 4 * batch * L * H * P * esize
            rows.append(dict(op="sdpa_causal", L=L, batch=batch, N=0, fwd_ms=f, fwdbwd_ms=fb,
                             fwd_graph_ms=float("nan"),
                             fwd_TFLOPs=fl / f / 1e9, fwdbwd_TFLOPs=3.5 * fl / fb / 1e9,
                             fwd_GBs=by_f / f / 1e6, fwdbwd_GBs=2 * by_f / fb / 1e6,
                             fwd_floor_ms=max(fl / (tfl * 1e9), by_f / (gbs * 1e6))))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    prof = None
    if args.profile:
        prof = profile_ssd(4096, tokens, H, P, N, G, Q, dtype)
        print(prof.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        from ssdbench.kernels import ssd_triton as K
        for name in ("_state_fwd", "_chunk_fwd", "_state_bwd", "_chunk_dc", "_chunk_dx", "_chunk_db"):
            print(name, "last tuned config:", getattr(getattr(K, name), "best_config", "fixed"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out / "ssd_bench.csv", index=False)
        md = (f"device: {torch.cuda.get_device_name()}; copy {gbs:.0f} GB/s, bf16 matmul {tfl:.0f} TFLOP/s; "
              f"dtype {args.dtype}, tokens {tokens}, H={H}, P={P}, N={N}, G={G}, chunk {Q}\n\n" + bench_report.markdown(df))
        if prof is not None:
            md += "\nPer-kernel time, one forward+backward at L=4096:\n\n" + bench_report.markdown(prof)
        (args.out / "ssd_bench.md").write_text(md)
    return df


if __name__ == "__main__":
    main()
