"""Benchmark of Based's sliding-window attention: SDPA with a boolean band mask vs FlexAttention
with a block mask (GPU only).

    python -m ssdbench.bench_window --out results/h100      # or: ssdbench bench window

Times forward and forward+backward (``triton.testing.do_bench``, median) of the attention core
(RoPE'd q, k, v already in (batch, H, L, P); no projections) across L at a fixed number of
tokens per batch (default bf16, 65,536 tokens, H=16, P=64, window 64), optionally with packed
documents (``--docs N``: N equal documents per row, masked through seq_idx). The result decides
``AUTO_WINDOW_IMPL`` in ssdbench/models/based.py.

FLOPs counted as the useful band only: 4 * min(W, L) * H * P per query (QK^T and AV; the
causal band's lower-left triangle makes the real work slightly smaller for the first W tokens).
forward+backward = 3 x forward. SDPA with a dense mask does the full L x L work and reads an
L x L mask (its cost grows as L^2); FlexAttention skips blocks outside the band, so its time
should stay flat per token.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ssdbench import bench_report
import torch


def window_flops(batch, L, H, P, W):
    return batch * L * 4 * min(W, L) * H * P


def bench_case(do_bench, impl, L, tokens, H, P, W, dtype, docs):
    import torch.nn.functional as F

    from ssdbench.models.based import flex_window_attention, window_mask

    batch = max(1, tokens // L)
    dev = "cuda"
    # A fresh Dynamo cache per case: with dynamic=False every L (and grad / no-grad) is its own
    # graph, and past torch._dynamo's recompile limit flex_attention silently runs eagerly
    # (materialising the L x L scores: out of memory at L = 8K).
    torch._dynamo.reset()
    q, k, v = (torch.randn(batch, H, L, P, device=dev, dtype=dtype) for _ in range(3))  # (batch, H, L, P)
    seq_idx = None
    if docs > 1:
        seq_idx = (torch.arange(L, device=dev) * docs // L).to(torch.int32).expand(batch, L).contiguous()

    if impl == "sdpa":
        def fwd():
            mask = window_mask(L, W, seq_idx, dev)  # rebuilt each call, as in the model
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        def fwd():
            return flex_window_attention(q, k, v, W, seq_idx)  # block mask rebuilt each call
    fwd()  # compile / warm up
    with torch.no_grad():
        f = do_bench(fwd, return_mode="median")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    gy = torch.randn(batch, H, L, P, device=dev, dtype=dtype)

    def step():
        fwd().backward(gy)

    step()
    fb = do_bench(step, grad_to_none=leaves, return_mode="median")
    return batch, f, fb


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for window_bench.csv / .md")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--docs", type=int, default=1, help="packed documents per row (seq_idx mask)")
    ap.add_argument("--impls", nargs="+", default=["sdpa", "flex"], choices=["sdpa", "flex"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    bench_report.require_cuda("window")
    from triton.testing import do_bench

    from ssdbench.models.based import HAS_FLEX

    dtype = getattr(torch, args.dtype)
    H, P, W, tokens = args.heads, args.headdim, args.window, args.tokens
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; window {W}")
    rows = []
    for impl in args.impls:
        if impl == "flex" and not HAS_FLEX:
            print("bench_window: FlexAttention unavailable (torch < 2.5), skipped", file=sys.stderr)
            continue
        for L in args.lens:
            try:
                batch, f, fb = bench_case(do_bench, impl, L, tokens, H, P, W, dtype, args.docs)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(impl=impl, L=L, batch=max(1, tokens // L), fwd_ms=float("nan"),
                                 fwdbwd_ms=float("nan"), fwd_TFLOPs=float("nan"), fwdbwd_TFLOPs=float("nan"),
                                 fwd_ns_per_tok=float("nan"), note="OOM"))
                continue
            fl = window_flops(batch, L, H, P, W)
            ntok = batch * L
            rows.append(dict(impl=impl, L=L, batch=batch, fwd_ms=f, fwdbwd_ms=fb,
                             fwd_TFLOPs=fl / f / 1e9, fwdbwd_TFLOPs=3 * fl / fb / 1e9,
                             fwd_ns_per_tok=f * 1e6 / ntok, note=""))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    bench_report.print_table(df, f"Sliding-window attention ({args.dtype}, {tokens} tokens/batch, H={H}, P={P}, W={W}, docs={args.docs})")
    bench_report.write(df, args.out, "window_bench", "ssdbench.bench_window", argv)
    return df


if __name__ == "__main__":
    main()
